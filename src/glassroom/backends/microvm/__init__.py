"""The ``microvm`` backend: a dedicated guest kernel per sandbox (QEMU ``-M microvm``).

``image`` builds and caches the kernel, initramfs and root image; ``qemu``
chooses the accel and drives QEMU; ``_instance`` is the backend itself;
``_channel`` validates every frame the (untrusted) guest sends.
"""

from ._instance import MicrovmBackend, MicrovmInstance, MicrovmProcess

__all__ = ["MicrovmBackend", "MicrovmInstance", "MicrovmProcess"]
