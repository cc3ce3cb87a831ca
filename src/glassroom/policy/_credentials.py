"""``[[credentials]]``: what a task may be handed, from where, and how.

A credential is never part of the sandbox's image or environment at start;
the supervisor fetches or mints it at create time, injects it the way the
policy says, and revokes it at destroy.  The policy names the *source*, not
the secret: values never appear in a policy, a plan or the audit log.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from glassroom.policy import _network

#: Source schemes; the part after the colon is the scheme's own address.
SCHEMES = ("vault", "vault-token", "env", "file", "broker")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: Header names a credential may not go in: they frame or route the request.
#: ``env``: variables a credential may not take over.  Each one either carries a
#: wall (the proxy variables and CA bundles point every client at the egress
#: proxy), decides what runs (PATH, LD_*, PYTHON*, NODE_OPTIONS, BASH_ENV), or
#: is glassroom's own (GLASSROOM_*).  A secret in one of them would break the
#: sandbox's clients in ways that look like anything but a credential problem.
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_ENV_RESERVED = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "TMPDIR", "TERM", "IFS", "ENV",
    "BASH_ENV", "NODE_OPTIONS", "NODE_PATH", "NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE",
    "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "PIP_CERT",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "FTP_PROXY",
})  # fmt: skip
_ENV_RESERVED_PREFIX = ("LD_", "PYTHON", "GLASSROOM_")
_FRAMING = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
    "trailer", "upgrade", "proxy-authorization", "proxy-connection", "expect",
})  # fmt: skip


def host_problem(text: str) -> str | None:
    """A ``hosts`` entry: a ``[network]`` entry (same parser, same errors), no CIDR."""
    problem = _network.entry_problem(text)
    if problem:
        return problem
    if _network.parse_entry(text).kind == "cidr":
        return f"{text!r}: a credential goes to named hosts or addresses, not to a CIDR block"
    return None


def _host(value: str) -> str:
    problem = host_problem(value)
    if problem:
        raise ValueError(problem)
    return value


CredentialHost = Annotated[str, AfterValidator(_host)]


class CredentialPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    #: What the task asks for; also the file name / env var suffix.
    name: str
    #: ``vault:PATH#FIELD`` (a secret read via the supervisor's Vault/OpenBao
    #: token), ``vault-token`` (a child token with ``scope`` as its policies),
    #: ``env:NAME`` (the supervisor's own env var), ``file:/path`` (a host file
    #: read by the supervisor), ``broker`` (a glassroom-signed token).
    source: str
    #: Lifetime in seconds; never longer than resources.max_runtime_s.
    #: None: the sandbox's max runtime.
    ttl_s: float | None = Field(default=None, gt=0, strict=True)
    #: Passed on where the source supports scopes (broker claims, Vault
    #: policies).  Empty: no scope (Vault: the default policy only).
    scope: list[str] = Field(default_factory=list)
    #: ``file``: /run/glassroom/secrets/NAME, mode 0400; ``env``: an env var
    #: (audited as a warning); ``proxy``: only a placeholder inside, the real
    #: value is added by the egress proxy on requests to ``hosts``.
    inject: Literal["file", "env", "proxy"] = "file"
    #: inject = "proxy": the ``host[:port]`` pairs whose requests may carry the
    #: value (``[network]`` entry syntax, no CIDR).  A bare host means port 80
    #: for plain HTTP and 443 for HTTPS.  Empty: refused (nowhere to send it).
    hosts: list[CredentialHost] = Field(default_factory=list)
    #: inject = "proxy": the header the value may go in, with the shape the
    #: client sends (``{secret}`` where it puts the placeholder).
    header: str = "Authorization: Bearer {secret}"
    #: inject = "env" or "proxy": the variable the value (or placeholder) is
    #: put in, e.g. ``OPENAI_API_KEY``, so an agent finds it where it already
    #: looks.  None: ``GLASSROOM_SECRET_NAME``.
    env: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must match [a-z][a-z0-9_]{0,31} (it becomes a file and env name)")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        scheme, _, rest = v.partition(":")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown source scheme {scheme!r} (known: {', '.join(SCHEMES)})")
        if scheme == "vault" and ("#" not in rest or not rest.split("#")[0]):
            raise ValueError("vault source must look like vault:PATH#FIELD")
        if scheme == "env" and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", rest):
            raise ValueError("env source must look like env:NAME")
        if scheme == "file" and not rest.startswith("/"):
            raise ValueError("file source must be an absolute path: file:/path")
        if scheme in ("broker", "vault-token") and rest:
            raise ValueError(f"{scheme} takes no address")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not _ENV_NAME.match(v):
            raise ValueError(f"env {v!r} must be a variable name ([A-Za-z_][A-Za-z0-9_]*)")
        up = v.upper()
        if up in _ENV_RESERVED or up.startswith(_ENV_RESERVED_PREFIX):
            raise ValueError(f"env {v!r} is reserved: it carries a wall, decides what runs, "
                             "or is glassroom's own; name another variable")  # fmt: skip
        return v

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        if "{secret}" not in v or ":" not in v:
            raise ValueError("header must look like 'Name: ... {secret} ...'")
        name = v.partition(":")[0].strip()
        if not _TOKEN.match(name) or any(c in v for c in "\r\n\0"):
            raise ValueError(f"header {v!r}: the name must be an HTTP token "
                             "and the line must have no CR, LF or NUL")  # fmt: skip
        if name.lower() in _FRAMING:
            raise ValueError(f"header {name!r} frames or routes the request; "
                             "a credential cannot go in it")  # fmt: skip
        return v

    @model_validator(mode="after")
    def _proxy_fields(self) -> CredentialPolicy:
        if self.inject == "proxy":
            if not self.hosts:
                raise ValueError("inject = 'proxy' needs hosts (where the header may be sent)")
        elif self.hosts:
            raise ValueError("hosts only applies to inject = 'proxy'")
        if self.env is not None and self.inject == "file":
            raise PydanticCustomError(
                "glassroom_policy", "{reason}",
                {"reason": "env names a variable: it applies to inject = 'env' or 'proxy', not "
                           f"'file' (the file is /run/glassroom/secrets/{self.name})",
                 "at": ("env",)},
            )  # fmt: skip
        return self

    @property
    def var(self) -> str | None:
        """The variable the task sees it in (None for a file credential)."""
        if self.inject == "file":
            return None
        return self.env or "GLASSROOM_SECRET_" + self.name.upper()

    @property
    def scheme(self) -> str:
        return self.source.partition(":")[0]
