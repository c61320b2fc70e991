"""Evidence: signed delivery receipts and a tamper-evident audit log (CONTRACT §11).

Pure code (no trio): `canonical` (the byte-exact encodings), `keys` (signing with
the node's TLS key, verifying with a certificate), `receipts` (receipts, Merkle
batches, the receipt store), `audit` (the hash-chained log and its verifier).
docs/EVIDENCE.md is the reference for every encoding.
"""
