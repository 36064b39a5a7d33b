"""TLS for NBD (STARTTLS) and HTTPS, client certificates, bearer tokens: real clients only."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from service.app import Service
from service.config import ConfigError, from_sources
from service.model import DiskSpec, SecurityConfig, ServiceConfig
from service.nbd.constants import IHAVEOPT, NBD_FLAG_C_FIXED_NEWSTYLE, Option, Reply
from tests.service.conftest import nbdsh, run

MiB = 1 << 20
RW_TOKEN = "rw-token-0123456789abcdef"
RO_TOKEN = "ro-token-0123456789abcdef"


async def openssl(*args: str, cwd: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "openssl", *args, cwd=cwd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def make_pki(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, laid out
    as libnbd and QEMU expect (ca-cert.pem, client-cert.pem, client-key.pem)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    await openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
                  "-subj", "/CN=vblk test CA", cwd=directory)  # fmt: skip
    for name, extensions in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (directory / f"{name}.ext").write_text(extensions)
        await openssl("req", *ec, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
                      "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
        await openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                      "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2", "-extfile", f"{name}.ext",
                      cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="vblk-pki-"))
    asyncio.run(make_pki(directory))
    # A client directory without a client certificate, for the refusal case.
    anonymous = directory / "anonymous"
    anonymous.mkdir()
    shutil.copy(directory / "ca-cert.pem", anonymous / "ca-cert.pem")
    (directory / "tokens").write_text(f"# vblk tokens\nrw {RW_TOKEN}\nro {RO_TOKEN}\n")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def secured_service(pki: Path, **security: object) -> Service:
    config = ServiceConfig(
        disks=(DiskSpec(name="disk0", backend="memory", size=8 * MiB),),
        guest_memory=64 * MiB,
        nbd_listen=("127.0.0.1:0",),
        http_listen=("127.0.0.1:0",),
        security=SecurityConfig(
            tls_cert=pki / "server-cert.pem",
            tls_key=pki / "server-key.pem",
            **security,  # type: ignore[arg-type]
        ),
    )
    service = Service(config)
    await service.start()
    await service.start_front_ends()
    return service


async def test_nbd_tls_required_with_nbdinfo_nbdsh_and_qemu(
    pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = await secured_service(pki, tls="require")
    try:
        port = service.nbd_addresses[0].rsplit(":", 1)[1]
        tls_uri = f"nbds://127.0.0.1:{port}/disk0?tls-certificates={pki}"
        info = json.loads((await run("nbdinfo", "--json", tls_uri)).stdout)
        assert info["exports"][0]["export-size"] == 8 * MiB
        # Without TLS nothing but STARTTLS and ABORT is answered.
        plain = await run("nbdinfo", f"nbd://127.0.0.1:{port}/disk0", check=False)
        assert plain.returncode != 0
        # On the wire: LIST and INFO get NBD_REP_ERR_TLS_REQD, EXPORT_NAME a closed connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
        await reader.readexactly(18)
        writer.write(struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE))
        for option in (Option.LIST, Option.INFO):
            writer.write(struct.pack(">QII", IHAVEOPT, option, 0))
            _, replied_to, reply, length = struct.unpack(">QIII", await reader.readexactly(20))
            assert (replied_to, reply) == (option, Reply.ERR_TLS_REQD)
            assert b"TLS" in await reader.readexactly(length)
        writer.write(struct.pack(">QII", IHAVEOPT, Option.EXPORT_NAME, 5) + b"disk0")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # Data goes through TLS both ways, and QEMU's client speaks it too.
        await nbdsh(
            tls_uri,
            "h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(uri)\n"
            "h.pwrite(b'\\x5a' * 65536, 0); h.flush()",
        )
        creds = f"tls-creds-x509,id=tls0,dir={pki},endpoint=client"
        opts = f"driver=nbd,host=127.0.0.1,port={port},export=disk0,tls-creds=tls0"
        read = await run("qemu-io", "--object", creds, "--image-opts", opts, "-c", "read -P 0x5a 0 64k")
        assert "read 65536/65536" in read.stdout
        await run("qemu-img", "info", "--object", creds, "--image-opts", opts)
    finally:
        await service.stop()
    # A TLS session cannot be half-closed: nothing may ask the transport to stay half open.
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]
    assert sum(1 for r in caplog.records if isinstance(r.msg, dict) and r.msg["event"] == "nbd_tls") >= 3


async def test_client_certificates_and_tls_on_mode(pki: Path) -> None:
    service = await secured_service(pki, tls="on", tls_ca=pki / "ca-cert.pem", tls_verify_client=True)
    try:
        port = service.nbd_addresses[0].rsplit(":", 1)[1]
        await run("nbdinfo", f"nbds://127.0.0.1:{port}/disk0?tls-certificates={pki}")
        anonymous = await run("nbdinfo", f"nbds://127.0.0.1:{port}/disk0?tls-certificates={pki}/anonymous",
                              check=False)  # fmt: skip
        assert anonymous.returncode != 0
        # "on": TLS is offered, not required.
        await run("nbdinfo", f"nbd://127.0.0.1:{port}/disk0")
    finally:
        await service.stop()


async def test_https_and_bearer_tokens(pki: Path) -> None:
    service = await secured_service(pki, http_tls=True, tokens_file=pki / "tokens")
    base = f"https://{service.http_addresses[0]}"
    context = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    try:
        async with aiohttp.ClientSession(base_url=base, connector=aiohttp.TCPConnector(ssl=context)) as http:
            async with http.get("/v1/disks") as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await r.json())["error"] == "unauthorized"
            async with http.get("/v1/disks", headers={"Authorization": "Bearer wrong-token-000000000"}) as r:
                assert r.status == 401
            ro = {"Authorization": f"Bearer {RO_TOKEN}"}
            rw = {"Authorization": f"Bearer {RW_TOKEN}"}
            async with http.get("/v1/disks/disk0/sectors/0", headers=ro) as r:
                assert r.status == 200
            async with http.put("/v1/disks/disk0/sectors/0", data=b"\1" * 512, headers=ro) as r:
                assert r.status == 403 and (await r.json())["error"] == "read_only_token"
            async with http.put("/v1/disks/disk0/sectors/0", data=b"\1" * 512, headers=rw) as r:
                assert r.status == 200
            async with http.get("/metrics") as r:  # public by default
                assert r.status == 200
            async with http.get("/healthz") as r:
                assert r.status == 200
        # curl over HTTPS too, with the CA.
        auth = f"Authorization: Bearer {RO_TOKEN}"
        out = await run("curl", "-sS", "-f", "--cacert", str(pki / "ca-cert.pem"), "-H", auth,
                        "-r", "0-511", f"{base}/v1/disks/disk0")  # fmt: skip
        assert out.stdout == "\1" * 512
    finally:
        await service.stop()


def test_bad_security_settings_are_usage_errors(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls-cert and tls-key"):
        from_sources({"tls": "require"}, {})
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        from_sources(
            {"tls": "on", "tls_cert": str(tmp_path / "x.pem"), "tls_key": str(tmp_path / "y.pem")}, {}
        )
    bad = tmp_path / "tokens"
    bad.write_text("admin short\n")
    with pytest.raises(ConfigError, match="rw TOKEN"):
        from_sources({"tokens_file": str(bad)}, {})
    with pytest.raises(ConfigError, match="tls-ca"):
        from_sources(
            {"tls": "on", "tls_cert": str(pki / "server-cert.pem"), "tls_key": str(pki / "server-key.pem"),
             "tls_verify_client": True}, {},
        )  # fmt: skip
