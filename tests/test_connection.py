"""Connection options: where they come from, what is refused before connecting, and how secrets stay hidden."""

from __future__ import annotations

import base64
import json
import ssl
import time
from pathlib import Path

import pytest
from nats.errors import AuthorizationError
from nats.errors import Error as NatsError

from runtime.cli import build_parser
from runtime.cli.common import connect_options
from runtime.connection import ConnectOptions, check_creds, redact_url, refusal
from runtime.errors import AuthError, ConfigError
from runtime.permissions import permission_denied
from runtime.settings import Settings


def _creds(path: Path, exp: int | None) -> Path:
    claims = {"sub": "UABC", "nats": {"type": "user", "version": 2}}
    if exp is not None:
        claims["exp"] = exp
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    jwt = f"eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.{body}.c2ln"
    path.write_text(f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
                    "-----BEGIN USER NKEY SEED-----\nSUAEXAMPLE\n------END USER NKEY SEED------\n")
    return path


@pytest.mark.parametrize(("url", "shown"), [
    ("nats://alice:s3cret@127.0.0.1:4222", "nats://alice:***@127.0.0.1:4222"),
    ("nats://tok3n@host:4222", "nats://***@host:4222"),
    ("tls://a:b@n1:4222,tls://a:b@n2:4222", "tls://a:***@n1:4222,tls://a:***@n2:4222"),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
])
def test_urls_are_shown_without_their_secrets(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_secrets_never_print(tmp_path: Path) -> None:
    options = ConnectOptions(user="alice", password="s3cret", token="t0ken")
    for text in (repr(options), str(options), str(Settings(connect=options)), options.identity()):
        assert "s3cret" not in text and "t0ken" not in text
    assert options.nats_kwargs("nats://h:1")["password"] == "s3cret"


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_USER", "env-user")
    monkeypatch.setenv("NATS_PASSWORD", "env-pass")
    monkeypatch.setenv("NATS_CA", "/env/ca.pem")
    args = build_parser().parse_args(["ls", "--user", "flag-user", "--tls-first"])
    options = connect_options(args)
    assert options.user == "flag-user"
    assert options.password is not None and options.password.get_secret_value() == "env-pass"
    assert options.tls_ca == Path("/env/ca.pem")
    assert options.tls_first is True
    serve = connect_options(build_parser().parse_args(["serve", "--creds", "/x.creds"]))
    assert serve.creds == Path("/x.creds")


@pytest.mark.parametrize(("options", "problem"), [
    (ConnectOptions(user="alice"), "needs a password"),
    (ConnectOptions(password="x"), "needs a user"),
    (ConnectOptions(tls_cert=Path("/c.pem")), "both a client certificate"),
])
def test_options_that_cannot_work_are_refused_before_connecting(options: ConnectOptions, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        options.check()


@pytest.mark.parametrize(("options", "problem"), [
    (ConnectOptions(creds=Path("/nowhere/user.creds")), "creds file /nowhere/user.creds: no such file"),
    (ConnectOptions(tls_ca=Path("/nowhere/ca.pem")), "TLS CA /nowhere/ca.pem: no such file"),
])
def test_credential_files_that_cannot_be_read_are_named(options: ConnectOptions, problem: str) -> None:
    with pytest.raises(AuthError, match=problem):
        options.check()


def test_a_creds_file_is_read_and_its_expiry_checked(tmp_path: Path) -> None:
    check_creds(_creds(tmp_path / "ok.creds", int(time.time()) + 3600))
    check_creds(_creds(tmp_path / "forever.creds", None))
    with pytest.raises(AuthError, match=r"expired at \d{4}-\d\d-\d\d"):
        check_creds(_creds(tmp_path / "old.creds", int(time.time()) - 10))
    junk = tmp_path / "junk.creds"
    junk.write_text("hello")
    with pytest.raises(AuthError, match="not a NATS credentials file"):
        ConnectOptions(creds=junk).check()


def test_a_bad_nkey_seed_file_is_named(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_text("not a seed\n")
    with pytest.raises(AuthError, match=f"NKey seed file {seed}: does not hold an NKey seed"):
        ConnectOptions(nkey=seed).check()


def test_refusals_are_said_in_one_line() -> None:
    url = "nats://alice:s3cret@127.0.0.1:4222"
    options = ConnectOptions(user="alice", password="s3cret")
    found = refusal(AuthorizationError(), url, options)
    assert found is not None
    assert str(found) == ("authentication failed: the NATS server at nats://alice:***@127.0.0.1:4222 refused "
                          "user 'alice' (wrong password, token, key or credentials?)")
    expired = refusal(NatsError("nats: 'user authentication expired'"), url, ConnectOptions(creds=Path("u.creds")))
    assert expired is not None and "expired the credentials in u.creds" in str(expired)
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message = "unable to get local issuer certificate"
    text = str(refusal(untrusted, "tls://127.0.0.1:4222", ConnectOptions()))
    assert text == ("TLS: the certificate of the NATS server at tls://127.0.0.1:4222 is not trusted "
                    "(pass the CA that signed it with --tlsca): unable to get local issuer certificate")
    assert refusal(ConnectionRefusedError(111, "refused"), url, options) is None


def test_permission_violations_name_the_action_and_subject() -> None:
    denied = permission_denied(NatsError('nats: permissions violation for publish to "fn.invoke.payroll"'))
    assert denied is not None
    assert denied.message == "permission denied: publish to fn.invoke.payroll"
    assert (denied.action, denied.subject, denied.code) == ("publish", "fn.invoke.payroll", 403)
    sub = permission_denied(NatsError('nats: permissions violation for subscription to "_INBOX.x.*"'))
    assert sub is not None and sub.message == "permission denied: subscribe to _INBOX.x.*"
    assert permission_denied(NatsError("nats: slow consumer")) is None


def test_an_inbox_prefix_must_be_a_subject_prefix() -> None:
    assert ConnectOptions.from_env({}, inbox_prefix="_INBOX.alice").inbox_prefix == "_INBOX.alice"
    with pytest.raises(ConfigError, match="inbox_prefix"):
        ConnectOptions.from_env({}, inbox_prefix="_INBOX.>")


@pytest.mark.parametrize(("reported", "subject"), [
    ("$js.api.direct.get.kv_fn_manifests.$kv.fn_manifests.payroll",
     "$JS.API.DIRECT.GET.KV_fn_manifests.$KV.fn_manifests.payroll"),
    ("$js.api.stream.info.fn_dlq", "$JS.API.STREAM.INFO.FN_DLQ"),
    ("$js.api.consumer.msg.next.fn.hello", "$JS.API.CONSUMER.MSG.NEXT.FN.hello"),
    ("$js.api.info", "$JS.API.INFO"),
    ("_inbox.abc.*", "_INBOX.abc.*"),
    ("$kv.fn_results.alice.x", "$KV.fn_results.alice.x"),
    ("fn.invoke.payroll", "fn.invoke.payroll"),
])
def test_subjects_nats_py_lowered_are_said_as_the_server_knows_them(reported: str, subject: str) -> None:
    denied = permission_denied(NatsError(f'nats: permissions violation for publish to "{reported}"'))
    assert denied is not None and denied.subject == subject
