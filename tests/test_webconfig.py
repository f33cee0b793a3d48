"""The web-config file: what is accepted, and a one-line error naming the file and key for the rest."""

from __future__ import annotations

import sys

import pytest
from tlsutil import bcrypt_hash, make_cert

from agent.cli import main
from agent.webconfig import BasicAuth, WebConfigError, load


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    return make_cert(d, "server"), make_cert(d, "other")


def write(tmp_path, text: str, name: str = "web.yml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_empty_file_is_plain_http_without_auth(tmp_path):
    web = load(write(tmp_path, ""))
    assert web.ssl_context is None and web.auth is None and web.describe() == "plain HTTP, no basic auth"


def test_tls_and_users(tmp_path, certs):
    (cert, key), _ = certs
    web = load(write(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                               f"basic_auth_users:\n  alice: {bcrypt_hash('pw')}\n  bob: {bcrypt_hash('pw2')}\n"))
    assert web.ssl_context is not None and web.auth is not None
    assert web.describe() == "TLS TLS12-TLS13, basic auth for 2 users"


def test_inline_certificate_and_key(tmp_path, certs):
    (cert, key), _ = certs
    indent = lambda text: "\n".join("    " + line for line in text.splitlines())  # noqa: E731
    web = load(write(tmp_path, f"tls_server_config:\n  cert: |\n{indent(cert.read_text())}\n"
                               f"  key: |\n{indent(key.read_text())}\n"))
    assert web.ssl_context is not None


@pytest.mark.parametrize("text, message", [
    ("tls_server_config:\n  cert_fil: a.pem\n", r"web\.yml: tls_server_config\.cert_fil: unknown setting$"),
    ("basic_auth_user:\n  a: b\n", r"web\.yml: basic_auth_user: unknown setting$"),
    ("basic_auth_users:\n  alice: plaintext\n", r"basic_auth_users: alice: not a bcrypt hash"),
    ("tls_server_config: [\n", r"web\.yml: invalid YAML at line 2"),
    ("- a\n- b\n", r"web\.yml: expected a map of settings at the top level$"),
    ("tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n",
     r"web\.yml: tls_server_config\.cert_file: cannot read .*/missing\.pem: no such file or directory$"),
    ("tls_server_config:\n  cert_file: a.pem\n", r"tls_server_config: cert_file and key_file go together$"),
    ("tls_server_config:\n  cert_file: a.pem\n  key_file: a.key\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
     r"tls_server_config\.cipher_suites: not supported by gpu-cost-agent"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
     r"client_auth_type RequireAndVerifyClientCert requires client_ca_file$"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n",
     r"client_auth_type: RequireAnyClientCert .* is not supported"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS13\n  max_version: TLS12\n",
     r"min_version TLS13 is above max_version TLS12$"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS14\n", r"tls_server_config\.min_version:"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", r"X-Frame-Options: Input should be"),
    ("http_server_config:\n  headers:\n    Set-Cookie: a\n", r"headers\.Set-Cookie: unknown setting$"),
    ("rate_limit:\n  interval: 1s\n  burst: 5\n", r"rate_limit: not supported by gpu-cost-agent"),
    # Response heads are Latin-1 on the wire: a value that is not ASCII would fail every response.
    ("http_server_config:\n  headers:\n    Content-Security-Policy: \"default-src ‘self’\"\n",
     r"headers\.Content-Security-Policy: a header value must be ASCII text$"),
])
def test_bad_files_are_refused_with_one_line(tmp_path, text, message):
    with pytest.raises(WebConfigError, match=message) as info:
        load(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_certificate_problems_are_named(tmp_path, certs):
    (cert, key), (_, other_key) = certs
    with pytest.raises(WebConfigError, match=r"cannot load the certificate and key: the key does not match"):
        load(write(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {other_key}\n"))
    junk = write(tmp_path, "not a certificate", "junk.pem")
    with pytest.raises(WebConfigError, match=r"tls_server_config\.cert_file: no PEM certificate in .*junk\.pem$"):
        load(write(tmp_path, f"tls_server_config:\n  cert_file: {junk}\n  key_file: {key}\n"))
    with pytest.raises(WebConfigError, match=r"tls_server_config\.key_file: no PEM private key in .*server\.pem$"):
        load(write(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {cert}\n"))


def test_missing_file(tmp_path):
    with pytest.raises(WebConfigError, match=r"nope\.yml: cannot read: No such file or directory$"):
        load(tmp_path / "nope.yml")


def test_users_without_bcrypt_installed_are_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bcrypt", None)  # import bcrypt now raises ImportError
    p = write(tmp_path, "basic_auth_users:\n  alice: $2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG\n")
    with pytest.raises(WebConfigError, match=r"basic_auth_users needs the bcrypt package: pip install"):
        load(p)


def test_basic_auth_checks_and_caches():
    auth = BasicAuth({"alice": bcrypt_hash("s3cret")})
    good = "Basic YWxpY2U6czNjcmV0"  # alice:s3cret
    assert not auth.cached(good)
    assert auth.check(good) and auth.cached(good)
    assert not auth.check("Basic YWxpY2U6d3Jvbmc=")  # alice:wrong
    assert not auth.check("Basic Ym9iOnMzY3JldA==")  # bob:s3cret
    assert not auth.check("Basic not-base64!") and not auth.check("Bearer x") and not auth.check(None)


def test_over_long_passwords_and_repeated_failures_cost_no_bcrypt():
    """bcrypt 5 raises on a password over 72 bytes (issue 15 item 4): refused without a check;
    a wrong password is checked once, then answered from memory."""
    import base64

    auth = BasicAuth({"alice": bcrypt_hash("s3cret")})
    header = lambda pw: "Basic " + base64.b64encode(b"alice:" + pw).decode()  # noqa: E731
    assert not auth.check(header(b"s" * 73)) and not auth.check(header("é".encode() * 40)) and auth.checks == 0
    assert auth.known("alice", b"s" * 73) is False
    assert not auth.check(header(b"wrong")) and auth.checks == 1
    assert not auth.check(header(b"wrong")) and auth.checks == 1
    assert auth.known("alice", b"wrong") is False and auth.known("alice", b"other") is None
    assert auth.check(header(b"s3cret")) and auth.checks == 2 and auth.known("alice", b"s3cret") is True


def test_htpasswd_style_2y_hashes_verify():
    # The hash from exporter-toolkit's documentation style ($2y$, as htpasswd -B writes).
    import bcrypt

    h = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1)
    assert BasicAuth({"u": h}).check("Basic dTpwdw==")  # u:pw


def test_check_config_validates_the_web_config(tmp_path, certs, capsys):
    (cert, key), _ = certs
    web = write(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    cfg = write(tmp_path, f'[agent]\nweb_config_file = "{web}"\n', "agent.toml")
    assert main(["check-config", str(cfg)]) == 0
    assert f"web config {web}: OK (TLS TLS12-TLS13, no basic auth)" in capsys.readouterr().out
    web.write_text("tls_server_config:\n  nonsense: 1\n")
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gpu-cost-agent: config error: {web}: tls_server_config.nonsense: unknown setting"


def test_run_refuses_a_bad_web_config_before_anything_starts(tmp_path, capsys):
    web = write(tmp_path, "basic_auth_users:\n  alice: plaintext\n")
    assert main(["demo", "--listen", "127.0.0.1:0", "--web.config.file", str(web)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gpu-cost-agent: config error: {web}: basic_auth_users: alice: not a bcrypt hash")
    assert len(err.splitlines()) == 1
