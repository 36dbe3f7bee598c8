"""The HTTP edge through real gunicorn: bearer tokens, and TLS with a certificate the test creates."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
import requests

from tests.processes import http_ready, wait_until

pytestmark = pytest.mark.e2e


def self_signed(directory) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_tls_and_bearer_tokens(stack, tmp_path):
    cert, key = self_signed(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("token-for-ci\n")
    stack.start_broker()
    stack.start_worker("--model", "echo")
    _, url = stack.start_gateway("--workers", "1", "--threads", "4", "--certfile", cert, "--keyfile", key,
                                 "--api-key-file", str(tokens))
    https = url.replace("http://", "https://")

    wait_until(lambda: http_ready(https, "/healthz", verify=cert), timeout_s=60, what="the HTTPS gateway")
    body = {"inputs": ["secret"]}
    no_token = requests.post(f"{https}/v1/models/echo/predict", json=body, timeout=10, verify=cert)
    wrong = requests.post(f"{https}/v1/models/echo/predict", json=body, timeout=10, verify=cert,
                          headers={"Authorization": "Bearer nope"})
    wait_until(lambda: http_ready(https, verify=cert, headers={"Authorization": "Bearer token-for-ci"}),
               timeout_s=30, what="ready")
    right = requests.post(f"{https}/v1/models/echo/predict", json=body, timeout=10, verify=cert,
                          headers={"Authorization": "Bearer token-for-ci"})
    assert (no_token.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert no_token.headers["WWW-Authenticate"].startswith("Bearer")
    assert right.json()["outputs"] == ["secret"]
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)  # plain HTTP is not served on the TLS port
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{https}/healthz", timeout=5)  # and the certificate is not trusted by default


def test_probes_and_metrics_need_no_token_unless_metrics_are_protected(stack, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("token-for-ci\n")
    stack.start_broker()
    stack.start_worker("--model", "echo")
    flags = ("--workers", "1", "--threads", "4", "--api-key-file", str(tokens))
    _, url = stack.start_gateway(*flags)
    _, protected = stack.start_gateway(*flags, "--protect-metrics")

    for gateway in (url, protected):
        wait_until(lambda: http_ready(gateway), timeout_s=60, what="/readyz without a token")  # Kubernetes sends none
        assert requests.get(f"{gateway}/healthz", timeout=10).status_code == 200
        assert requests.get(f"{gateway}/v1/status", timeout=10).status_code == 401
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 200
    assert requests.get(f"{protected}/metrics", timeout=10).status_code == 401
    assert requests.get(f"{protected}/metrics", timeout=10,
                        headers={"Authorization": "Bearer token-for-ci"}).status_code == 200
