"""The store in-process: migrations, lease boundaries on the database clock, secrets at rest."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet, InvalidToken

from openweights import types as t
from openweights.store import jobs as q
from openweights.store import orgs
from openweights.store.crypto import SecretBox
from openweights.store.schema import metadata


def test_migrations_build_exactly_the_declared_schema(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with db.write_engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), metadata
        )
    assert diff == []
    db.migrate()  # a second start is a no-op


def _org_worker_job(db, now):
    with db.write() as conn:
        org = orgs.create_org(conn, "o", now)
        w = q.register_worker(conn, org["id"], t.WorkerRegister(any_hardware=True), None, now)
        q.create_job(
            conn, org["id"], t.JobCreateParams(type="custom", script="true"), now, 3, lock=False
        )
    return org, w


def test_lease_boundary_uses_lease_expiry_exactly(db):
    t0, lease = 1_000_000.0, 30.0
    org, w = _org_worker_job(db, t0)
    with db.write() as conn:
        claim = q.claim(
            conn, q.get_worker(conn, org["id"], w["id"]), t0, lease, skip_locked=not db.is_sqlite
        )
    run_id = claim.run["id"]
    with db.read() as conn:
        assert q.expired_runs(conn, t0 + lease - 0.001) == []
        assert q.expired_runs(conn, t0 + lease + 0.001) == [run_id]
    # a heartbeat just before the boundary extends the lease from the database's now
    with db.write() as conn:
        lease_until, cancel = q.heartbeat(conn, org["id"], run_id, t0 + lease - 0.001, lease, None)
    assert lease_until == pytest.approx(t0 + 2 * lease - 0.001) and cancel is False
    with db.read() as conn:
        assert q.expired_runs(conn, t0 + lease + 0.001) == []
    with db.write() as conn:
        job = q.lose_run(conn, run_id, t0 + 3 * lease, "lease expired")
    assert job["status"] == "pending" and job["attempts"] == 1
    # a restarted server gives live runs one lease before it may declare them lost
    with db.write() as conn:
        claim = q.claim(
            conn, q.get_worker(conn, org["id"], w["id"]), t0, lease, skip_locked=not db.is_sqlite
        )
        assert q.grace_live_leases(conn, t0 + 10 * lease, lease) == 1
    with db.read() as conn:
        assert q.expired_runs(conn, t0 + 10 * lease + lease - 0.001) == []


def test_database_clock_is_used_on_postgres(db):
    import time

    with db.read() as conn:
        now = db.now(conn)
    assert abs(now - time.time()) < 5


def test_secrets_survive_key_rotation_and_tampering_is_detected():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    box = SecretBox([old])
    token = box.encrypt("hf_value")
    rotated_box = SecretBox([new, old])
    assert rotated_box.decrypt(token) == "hf_value"
    rotated = rotated_box.rotate(token)
    assert SecretBox([new]).decrypt(rotated) == "hf_value"
    with pytest.raises(InvalidToken):
        SecretBox([old]).decrypt(rotated)
    tampered = bytearray(rotated)
    tampered[20] ^= 1
    with pytest.raises(InvalidToken):
        rotated_box.decrypt(bytes(tampered))


def test_tokens_are_stored_as_hashes_only(db):
    with db.write() as conn:
        org = orgs.create_org(conn, "o", 1.0)
        _, secret = orgs.create_token(conn, org_id=org["id"], name="k", kind="user", now=1.0)
        rows = [dict(r) for r in conn.exec_driver_sql("SELECT * FROM tokens").mappings()]
    assert all(secret not in str(v) for r in rows for v in r.values())
    with db.read() as conn:
        p, _ = orgs.authenticate(conn, secret, 2.0)
    assert p.org_id == org["id"]


def test_org_names_fill_templates_as_valid_model_namespaces():
    from openweights.store.jobs import fill_placeholders
    from openweights.store.models import NAME_RE

    params = {"validated_params": {"finetuned_model_id": "{org_id}/tiny-{job_id}", "r": 8}}
    for org, ns in [("alignment lab", "alignment-lab"), ("lab/x", "lab-x"), ("my.org", "my.org"),
                    ("  ", "org"), ("Åsa's lab", "sa-s-lab")]:  # fmt: skip
        filled = fill_placeholders(params, job_id="ftjob-1", org_name=lambda o=org: o)
        name = filled["validated_params"]["finetuned_model_id"]
        assert name == f"{ns}/tiny-ftjob-1" and NAME_RE.match(name), name
        assert filled["validated_params"]["r"] == 8
