"""Test certificates made with the ``openssl`` command: a CA, a server and a client cert."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client cert signed by another CA
    rogue_key: Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)  # fmt: skip


def _signed(d: Path, name: str, ca: str, *, server: bool) -> None:
    ext = d / f"{name}.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        if server
        else "extendedKeyUsage=clientAuth\n"
    )
    _run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
         "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
         "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{name}.crt",
         cwd=d)  # fmt: skip


def make_certs(d: Path) -> Certs:
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _signed(d, "server", "ca", server=True)
    _signed(d, "client", "ca", server=False)
    _signed(d, "rogue", "rogue-ca", server=False)
    return Certs(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
                 d / "client.key", d / "rogue.crt", d / "rogue.key")  # fmt: skip
