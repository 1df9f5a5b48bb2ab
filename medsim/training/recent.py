"""How the latest check on recent images (`medsim calibration check`, stored as the
calibration's report.recent_check) is said where the calibration is used: /status and
`medsim status` per dataset, and beside every search's diagnosis set. A dataset never
checked says nothing new; a failed check says "not verified on recent images" everywhere
its numbers are shown, since a clinician reads the set, not the status page."""

from __future__ import annotations


def summary(check: dict | None) -> dict | None:
    """The stored check as /status shows it: verified or not, its sentence, when and on what.
    None where the dataset was never checked (nothing to say, no alarm)."""
    if not check or "verified" not in check:
        return None
    levels = [m.get("level") for m in (check.get("set") or {}).values() if m.get("level") is not None]
    return {"verified": bool(check["verified"]), "verdict": check.get("verdict"),
            "checked_at": check.get("checked_at"), "since": check.get("since"),
            "coverage": levels[0] if levels else None, "n": check.get("n")}


def note(check: dict | None, dataset: str) -> str | None:
    """The sentence beside a diagnosis set of `dataset` where its calibration's latest check
    on recent images fell short; None where it passed or was never run."""
    s = summary(check)
    if s is None or s["verified"]:
        return None
    when = f"; checked {s['checked_at'][:10]}" if s.get("checked_at") else ""
    return f"{dataset}: {s['verdict']}{when}"


def of_models(conn, model_ids) -> dict[tuple[int, str], dict]:
    """{(model id, dataset): the stored check} for these models' checked calibrations, of
    the datasets the connection's role sees (row security on medsim.calibrations)."""
    from medsim.queries import Q

    found = conn.execute(Q.recent_checks, {"model_ids": sorted(set(model_ids))}).fetchall()
    return {(m, ds): c for m, ds, c in found if c}


def status_fields(check: dict | None, dataset: str) -> dict:
    """What /status adds to a model's dataset row: the check (null: never checked, nothing
    to say) and the sentence where it fell short."""
    return {"recent_check": summary(check), "calibration_note": note(check, dataset)}
