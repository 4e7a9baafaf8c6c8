"""ftune_client's Client without a coordinator: a token never leaves this
host in plaintext. (Calls against a real coordinator are in
client_integration_test.py.)

    PYTHONPATH=<build>/clients/python python3 tests/python/client_test.py
"""

import os
import tempfile
import unittest

from ftune_client import Client, is_loopback_address


class PlaintextTokenTest(unittest.TestCase):
    def test_loopback_is_this_host_only(self):
        # The cases of the C++ rule's test (tests/unit/auth_test.cc).
        for a in ("127.0.0.1:7450", "localhost:7450", "LOCALHOST", "[::1]:7450", "127.1.2.3:1",
                  "ipv4:127.0.0.1:7450", "dns:///localhost:7450", "unix:/tmp/ftune.sock", "::1"):
            self.assertTrue(is_loopback_address(a), a)
        for a in ("0.0.0.0:7450", "[::]:7450", ":7450", "10.0.0.5:7450",
                  "coordinator.internal:7450", "128.0.0.1:7450", "127.0.0.1.evil.com:1",
                  "localhost.evil.com:7450", "1127.0.0.1:7450", ""):
            self.assertFalse(is_loopback_address(a), a)

    def test_a_token_in_plaintext_to_another_host_is_refused(self):
        for address in ("10.0.0.5:7450", "coordinator.internal:7450", "0.0.0.0:7450"):
            with self.subTest(address=address):
                with self.assertRaises(ValueError) as caught:
                    Client(address, token="secret")
                message = str(caught.exception)
                self.assertIn("refusing to send the token in plaintext to " + address, message)
                self.assertIn("tls_ca", message)
                self.assertNotIn("secret", message)

    def test_what_is_allowed(self):
        # No token; a token on loopback; a token over TLS; a token on a
        # network the caller says it trusts. Channels connect lazily: no
        # coordinator is needed to build them.
        Client("10.0.0.5:7450").close()
        Client("127.0.0.1:7450", token="secret").close()
        Client("localhost:7450", token="secret").close()
        Client("10.0.0.5:7450", token="secret", insecure=True).close()
        with tempfile.TemporaryDirectory() as tmp:
            ca = os.path.join(tmp, "ca.pem")
            with open(ca, "w") as f:
                f.write("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
            Client("10.0.0.5:7450", token="secret", tls_ca=ca).close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
