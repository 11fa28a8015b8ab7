"""The development file channel: one JSON file per key, published atomically, idempotent."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from adapters.channels import Channel, FileChannel, OutgoingMessage, file_name


def message(key: str = "appointment-reminder|0|e1", body: str = "Hola") -> OutgoingMessage:
    return OutgoingMessage(key=key, channel="sms", address="+15550101", language="es",
                           subject="", body=body)


class TestFileChannel:
    def test_is_a_channel(self, tmp_path: Path) -> None:
        """FileChannel satisfies the Channel protocol."""
        channel: Channel = FileChannel(tmp_path)
        assert channel.lookup("nothing") is None

    def test_send_writes_one_file_named_by_key(self, tmp_path: Path) -> None:
        receipt = FileChannel(tmp_path).send(message())
        (path,) = tmp_path.glob("*.json")
        assert path.name == file_name("appointment-reminder|0|e1")
        assert "|" not in path.name
        data = json.loads(path.read_text())
        assert data["key"] == "appointment-reminder|0|e1" and data["body"] == "Hola"
        assert receipt.provider_ref == f"file:{path.name}" and not receipt.duplicate

    def test_second_send_with_the_same_key_delivers_nothing(self, tmp_path: Path) -> None:
        """Idempotent by key: the first record stays, the second call gets its receipt."""
        channel = FileChannel(tmp_path)
        first = channel.send(message(body="one"))
        second = channel.send(message(body="two"))
        assert second.duplicate and second.provider_ref == first.provider_ref
        (path,) = tmp_path.glob("*.json")
        assert json.loads(path.read_text())["body"] == "one"

    def test_lookup_finds_a_sent_key(self, tmp_path: Path) -> None:
        channel = FileChannel(tmp_path)
        assert channel.lookup("k") is None
        channel.send(message("k"))
        found = channel.lookup("k")
        assert found is not None and found.key == "k"

    def test_concurrent_sends_one_winner(self, tmp_path: Path) -> None:
        """Many threads sending the same key leave exactly one file and no temporary files."""
        channel = FileChannel(tmp_path)
        receipts = []

        def go(n: int) -> None:
            receipts.append(channel.send(message(body=str(n))))

        threads = [threading.Thread(target=go, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(list(tmp_path.iterdir())) == 1
        assert sum(1 for r in receipts if not r.duplicate) <= 1
        assert len({r.provider_ref for r in receipts}) == 1

    def test_distinct_keys_never_share_a_file(self, tmp_path: Path) -> None:
        """Keys that differ only in characters replaced in the name still get two files."""
        channel = FileChannel(tmp_path)
        channel.send(message("a|b"))
        channel.send(message("a:b"))
        assert len(list(tmp_path.glob("*.json"))) == 2
