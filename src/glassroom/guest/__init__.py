"""What runs inside a microVM: the guest agent (``agent.py``) and the wire
protocol (``protocol.py``) it shares with ``backends/microvm``.

Nothing here imports the host side: both files are copied into the guest
image and run there under ``python3 -I -S``.
"""
