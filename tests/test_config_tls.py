"""network.tls: a key that is not the certificate's is named before serving (issue 11 item 12).

gRPC said only "Failed to bind"; flotilla.network.tls_check.check_tls_pair names the key."""

import pytest

from flotilla.network.certs import make_deployment
from flotilla.network.tls_check import TLSFilesError, check_tls_pair


def creds_dir(creds):
    return creds["server_pem"].parent


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return make_deployment(tmp_path_factory.mktemp("certs"), devices=1)


def test_matching_pair_passes(creds):
    check_tls_pair(creds["server_pem"], creds["server_key"])


def test_wrong_key_is_named(creds, tmp_path):
    d = creds_dir(creds)
    with pytest.raises(TLSFilesError) as e:
        check_tls_pair(d / "server.pem", d / "client.key")
    assert str(e.value).startswith(f"network.tls.key: {d / 'client.key'} is not the private key of the certificate")
    assert "\n" not in str(e.value)


def test_missing_or_not_pem_files_are_named(creds, tmp_path):
    d = creds_dir(creds)
    with pytest.raises(TLSFilesError, match="^network.tls.cert: cannot read"):
        check_tls_pair(tmp_path / "nope.pem", d / "server.key")
    (tmp_path / "junk").write_bytes(b"\0\1\2")
    with pytest.raises(TLSFilesError, match="^network.tls.cert: .* is not a PEM certificate"):
        check_tls_pair(tmp_path / "junk", d / "server.key")
    with pytest.raises(TLSFilesError, match="^network.tls.key: .* is not a PEM private key"):
        check_tls_pair(d / "server.pem", d / "server.pem")
