"""E2B-compatible endpoints: the unmodified ``e2b`` and ``e2b-code-interpreter``
SDKs work against ``glassroom serve`` with ``E2B_API_URL`` and
``E2B_SANDBOX_URL`` both set to the server's URL.

Four parts: the control plane (``_control``), envd (``_envd``: files,
process and filesystem RPC), the code interpreter (``_interpreter``) and the
template build API (``_template_build``).
None of them is in the own API's OpenAPI spec.
"""

from __future__ import annotations

from fastapi import APIRouter

from . import _control, _envd, _interpreter, _template_build


def e2b_router() -> APIRouter:
    r = APIRouter(include_in_schema=False)
    add = r.add_api_route
    for prefix in ("", "/v2"):
        add(f"{prefix}/sandboxes", _control.create, methods=["POST"])
        add(f"{prefix}/sandboxes", _control.list_sandboxes, methods=["GET"])
        add(f"{prefix}/sandboxes/{{sandbox_id}}/connect", _control.connect, methods=["POST"])
    add("/sandboxes/{sandbox_id}/timeout", _control.set_timeout, methods=["POST"])
    add("/sandboxes/{sandbox_id}/pause", _control.pause, methods=["POST"])
    add("/sandboxes/{sandbox_id}/resume", _control.resume, methods=["POST"])
    add("/sandboxes/{sandbox_id}/snapshots", _control.create_snapshot, methods=["POST"])
    add("/sandboxes/{sandbox_id}/fork", _control.fork, methods=["POST"])
    add("/sandboxes/{sandbox_id}/network", _control.update_network, methods=["PUT"])
    add("/sandboxes/{sandbox_id}/metrics", _control.get_metrics, methods=["GET"])
    add("/snapshots", _control.list_snapshots, methods=["GET"])
    # E2B's template build API (``e2b.Template``); its DELETE /templates/{id} is also
    # the SDK's Sandbox.delete_snapshot: a snapshot is a template in E2B's model
    _template_build.add_routes(add)
    add("/sandboxes/{sandbox_id}", _control.get_info, methods=["GET"])
    add("/sandboxes/{sandbox_id}", _control.kill, methods=["DELETE"])
    add("/health", _envd.health, methods=["GET"])
    add("/files", _envd.get_file, methods=["GET"])
    add("/files", _envd.post_file, methods=["POST"])
    for method in (
        "Start",
        "Connect",
        "List",
        "SendInput",
        "SendSignal",
        "CloseStdin",
        "Update",
        "StreamInput",
    ):
        add(f"/process.Process/{method}", _envd.rpc, methods=["POST"])
    for method in (
        "Stat",
        "ListDir",
        "MakeDir",
        "Move",
        "Remove",
        "WatchDir",
        "CreateWatcher",
        "GetWatcherEvents",
        "RemoveWatcher",
    ):
        add(f"/filesystem.Filesystem/{method}", _envd.rpc, methods=["POST"])
    add("/execute", _interpreter.execute, methods=["POST"])
    add("/contexts", _interpreter.create_context, methods=["POST"])
    add("/contexts", _interpreter.list_contexts, methods=["GET"])
    add("/contexts/{context_id}", _interpreter.delete_context, methods=["DELETE"])
    add("/contexts/{context_id}/restart", _interpreter.restart_context, methods=["POST"])
    return r


__all__ = ["e2b_router"]
