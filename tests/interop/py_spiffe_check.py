"""Unmodified py-spiffe (PyPI `spiffe`) against a running Sigil daemon.

Usage: py_spiffe_check.py unix:///path/to/workload.sock TRUST_DOMAIN [--rotation]

Fetches the X509-SVID, the bundles and the X509 context with
WorkloadApiClient, checks the leaf is signed by the bundle's CA with the
`cryptography` package, and with --rotation keeps an X509Source open until
it sees a new SVID. Prints one JSON object; the Rust test asserts on it.
Any failure raises, so the process exits non-zero with a traceback.
"""

import json
import sys
import time

from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import TrustDomain, WorkloadApiClient, X509Source


def main() -> None:
    endpoint, trust_domain = sys.argv[1], sys.argv[2]
    want_rotation = "--rotation" in sys.argv[3:]
    result = {}

    client = WorkloadApiClient(socket_path=endpoint, default_timeout=10)
    svid = client.fetch_x509_svid()
    bundles = client.fetch_x509_bundles()
    context = client.fetch_x509_context()
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(trust_domain))
    if bundle is None:
        raise SystemExit(f"no bundle for {trust_domain}")
    authorities = list(bundle.x509_authorities)
    leaf = svid.leaf
    authorities[0].public_key().verify(
        leaf.signature,
        leaf.tbs_certificate_bytes,
        ec.ECDSA(leaf.signature_hash_algorithm),
    )
    result.update(
        spiffe_id=str(svid.spiffe_id),
        serial=format(leaf.serial_number, "x"),
        bundle_authorities=len(authorities),
        context_svids=len(context.x509_svids),
        context_default=str(context.default_svid.spiffe_id),
        leaf_signed_by_bundle=True,
    )

    if want_rotation:
        source = X509Source(socket_path=endpoint, timeout_in_seconds=10)
        first = source.svid.leaf.serial_number
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and source.svid.leaf.serial_number == first:
            time.sleep(0.05)
        rotated = source.svid.leaf
        result.update(
            source_first_serial=format(first, "x"),
            source_rotated_serial=format(rotated.serial_number, "x"),
            source_rotated_spiffe_id=str(source.svid.spiffe_id),
        )
        source.close()
    client.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
