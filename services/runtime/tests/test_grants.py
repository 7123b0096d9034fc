"""Credential grants (api.md §15.3): verified, bound to one secret, redeemed in memory for MCP arguments."""

from __future__ import annotations

import json
from typing import Any

import pytest

from langorch_infra.secrets import grant_key, make_grant, redeem_grants, verify_grant

pytestmark = pytest.mark.unit

KEY = grant_key("test-secret-key")


async def values(claims: dict[str, Any]) -> str:
    value = {"DB_PW": "s3cret-value", "CREDS": '{"user": "ann", "password": "pw-1"}'}[claims["secret_name"]]
    return str(json.loads(value)[claims["field"]]) if claims.get("field") else value


def test_grant_claims_and_expiry() -> None:
    grant = make_grant(KEY, run_id="r1", secret_name="DB_PW", node_id="n", step_id="s")
    claims = verify_grant(KEY, grant)
    assert (claims["sub"], claims["secret_name"], claims["aud"], claims["iss"]) == ("r1", "DB_PW",
                                                                                     "agent_credential", "langorch")
    assert claims["exp"] - claims["iat"] <= 300
    import jwt

    with pytest.raises(jwt.InvalidTokenError):
        verify_grant(grant_key("another key"), grant)


async def test_grants_in_arguments_are_replaced_by_values_and_others_left_alone() -> None:
    plain = make_grant(KEY, run_id="r1", secret_name="DB_PW", node_id="n", step_id="s")
    field = make_grant(KEY, run_id="r1", secret_name="CREDS", node_id="n", step_id="s", field="password")
    foreign = make_grant(grant_key("other"), run_id="r1", secret_name="DB_PW", node_id="n", step_id="s")
    args = {"dsn": f"postgres://app:{plain}@db/x", "pw": field, "list": [plain], "n": 3, "other": foreign}
    out = await redeem_grants(args, KEY, values)
    assert out == {"dsn": "postgres://app:s3cret-value@db/x", "pw": "pw-1", "list": ["s3cret-value"], "n": 3,
                   "other": foreign}
