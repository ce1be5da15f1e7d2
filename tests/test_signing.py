"""broker.signing: what the trigger signs verifies; anything else does not."""

from __future__ import annotations

import os

import pytest

from broker.signing import BadSignature, RowKey


def test_a_signed_payload_verifies_and_any_change_does_not() -> None:
    key = RowKey(os.urandom(64))
    signed = key.sign(b'{"id":"1"}')
    assert key.verify(signed) == b'{"id":"1"}' == key.verify(signed.decode())
    for forged in (
        signed[:-1] + b"2",
        b"0" * 64 + b'{"id":"1"}',
        b'{"id":"1"}',
        b"",
        RowKey(os.urandom(64)).sign(b'{"id":"1"}'),
    ):
        with pytest.raises(BadSignature):
            key.verify(forged)


def test_the_database_name_is_stable_and_not_the_key() -> None:
    secret = os.urandom(64)
    assert RowKey(secret).database == RowKey(secret).database != RowKey(os.urandom(64)).database
    assert secret.hex()[:16] not in RowKey(secret).database
    assert "secret" not in repr(RowKey(secret)) and secret.hex() not in repr(RowKey(secret))
    with pytest.raises(ValueError):
        RowKey(b"short")
