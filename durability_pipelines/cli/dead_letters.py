"""``dead-letters list|retry|resolve``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from durability_pipelines.cli.exit_codes import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, CliError
from durability_pipelines.cli.session import Session, default_who, iso, table

if TYPE_CHECKING:
    from durability_pipelines.consumer.storage import DeadLetter


def _dead_letter_dict(dl: DeadLetter) -> dict[str, Any]:
    return {"id": dl.id, "status": dl.status, "consumer": dl.consumer, "adapter": dl.adapter, "stream": dl.stream,
            "group": dl.group, "shard": dl.shard or None, "first_sequence": dl.first_sequence,
            "last_sequence": dl.last_sequence, "record_count": dl.record_count, "attempts": dl.attempts,
            "policy": dl.policy, "run_id": dl.run_id, "created_at": iso(dl.created_at), "error": dl.error}


def cmd_dead_letters_list(session: Session, args: argparse.Namespace) -> int:
    from durability_pipelines.consumer import storage as consumer_storage

    st = session.consumer_storage()
    consumer_storage.ensure(st.db)
    data = [_dead_letter_dict(dl) for dl in st.dead_letters(args.consumer, status=args.status)]

    def text() -> str:
        if not data:
            return "no dead letters"
        rows = [[d["id"], d["status"], d["consumer"], d["shard"], f"{d['first_sequence']}..{d['last_sequence']}",
                 d["record_count"], d["attempts"], d["policy"], d["created_at"],
                 (d["error"].splitlines() or [""])[0][:60]] for d in data]
        return table(["id", "status", "consumer", "shard", "sequences", "records", "attempts", "policy", "created",
                      "error"], rows)

    session.emit(data, text)
    return EXIT_OK


def _set_dead_letter(session: Session, args: argparse.Namespace, status: str) -> int:
    from durability_pipelines.consumer import storage as consumer_storage

    st = session.consumer_storage()
    consumer_storage.ensure(st.db)
    by = args.by or default_who()
    dl = next((d for d in st.dead_letters() if d.id == args.id), None)
    if dl is None:
        raise CliError(f"no dead letter with id {args.id}; see `durability-pipelines dead-letters list`",
                       EXIT_NOT_FOUND)
    shard = dl.shard or "(unsharded)"
    if dl.status == status:
        session.emit({"id": dl.id, "status": status, "changed": False},
                     f"dead letter #{dl.id} is already {status}; nothing changed")
        return EXIT_OK
    if status == "retry" and dl.status == "resolved":
        raise CliError(
            f"refused: dead letter #{dl.id} is resolved (policy {dl.policy}); its shard is not blocked by it. "
            f"To process sequences {dl.first_sequence}..{dl.last_sequence} again, rewind the checkpoint with "
            "`durability-pipelines checkpoints rewind ... --to-sequence S --reason ...`."
        )
    if not st.set_dead_letter_status(dl.id, status, by=by, note=args.note):
        raise CliError(f"dead letter #{dl.id} vanished while updating it", EXIT_NOT_FOUND)
    if status == "retry":
        hint = (f"consumer {dl.consumer} shard {shard} is unblocked: its sensor dispatches it again from the acked "
                f"checkpoint at the next tick, re-reading {dl.first_sequence}..{dl.last_sequence}")
    else:
        hint = (f"consumer {dl.consumer} shard {shard} is unblocked and resumes from the acked checkpoint, which "
                f"re-reads {dl.first_sequence}..{dl.last_sequence}. To skip that batch instead, first move the "
                f"checkpoint past it: `durability-pipelines checkpoints set {dl.adapter} {dl.stream} {dl.group} "
                f"<consumer> {dl.shard} --sequence {dl.last_sequence} --reason ...`")
    data = {"id": dl.id, "previous_status": dl.status, "status": status, "changed": True, "by": by,
            "note": args.note, "consumer": dl.consumer, "shard": dl.shard or None}
    session.emit(data, f"dead letter #{dl.id}: {dl.status} -> {status} by {by}\n  {hint}")
    return EXIT_OK


def cmd_dead_letters_retry(session: Session, args: argparse.Namespace) -> int:
    return _set_dead_letter(session, args, "retry")


def cmd_dead_letters_resolve(session: Session, args: argparse.Namespace) -> int:
    if not (args.note or "").strip():
        raise CliError("dead-letters resolve needs --note TEXT saying how it was resolved", EXIT_USAGE)
    return _set_dead_letter(session, args, "resolved")
