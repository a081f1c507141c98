"""Scripted event-sequence tests of the commit protocol (etcd raft's testdata style).

Each file in testdata/protocol/*.txt drives one :class:`JobProtocol` per node through
events and lists, after each event, the actions it produced, exactly and in order.
The interpreter delivers nothing by itself: a message reaches a node only when the
script says so, and only if its sender really sent it (the interpreter keeps what each
node sent: its announce, contributions and vote per version).

Script syntax (one statement a line; ``#`` starts a comment)::

    group n0 n1 n2 parity=1 [committed=V]   a group (repeat for more groups; the job is
                                            all of them, in order, and they form the
                                            commit tree of snapshotd.core.commit_tree:
                                            the first is the root); ``committed`` is the
                                            version each node's store already committed
    local N v=V blocks=B ranks=R,R          every local rank of N delivered V
    announce DESTS <- SRC v=V               SRC's announce of V reaches DESTS
    contribs SRC v=V [to=DESTS]             SRC's contributions for V reach their holders
                                            (only DESTS); one to a dead holder is lost
    contrib DEST <- SRC v=V s=S t=T p=P     one contribution (stripe, parity row, position)
    delivered N v=V                         every holder acknowledged N's contributions
    ack N <- DESTS what=W v=V               DESTS acknowledged N's W (announce, contrib,
                                            vote, report or word) of V
    resend N v=V                            N's retry timer fired: what it sends again
    vote DESTS <- SRC v=V                   SRC's vote for V reaches DESTS
    report DESTS <- SRC v=V                 SRC's report (its subtree is complete) reaches
                                            DESTS (members of its parent group)
    word DESTS <- SRC v=V                   SRC's commit word reaches DESTS (members of
                                            its child groups)
    gossip DESTS v=V                        a peer tells DESTS that V committed
    fence DESTS                             the job restarted from its committed version
    kill N                                  N dies: it takes part in nothing any more
    state DESTS                             print committed version and open rounds
    > N: <action>                           an expected output line of the event above

DESTS is a comma-separated list of nodes or ``*``: every live node it can go to (the
sender's group for an announce and a vote, its parent group for a report, its child
groups for a word, all for the rest; never the sender itself). A message may be
delivered where its sender would never send it (a vote to another group, as an older
daemon sends it): the receiver must ignore it. Actions print as ``SendAnnounce v=1
blocks=2 ranks=0``, ``SendContributions v=1 counts=2,2,2 stripes=3``, ``SendVote v=1
ranks=0``, ``SendReport v=1``, ``SendWord v=1``, ``Commit v=1``; ``fence`` prints
``Fenced dropped=2,3`` and ``state`` prints the committed version and each open round:
``committed=1 | v=2 announced=n0,n1 awaiting=? votes=-`` (``awaiting``: contributions
still to receive, ``?`` while the layout is unknown; in a job of several groups also
``reports=`` the child groups that reported and ``decided=yes|no``).

To write a new script, write its events and run
``python tests/core/test_protocol_scripts.py FILE``: it prints the script with the
``>`` lines the protocol produces. Read them before you keep them.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snapshotd.core.protocol import (
    Announce,
    Commit,
    JobProtocol,
    SendAnnounce,
    SendContributions,
    SendReport,
    SendVote,
    SendWord,
)

TESTDATA = Path(__file__).parent / "testdata" / "protocol"
JOB_ID = "job"


class ScriptError(Exception):
    """The script itself is wrong: bad syntax, or a message its sender never sent."""


class ScriptMismatch(AssertionError):
    """The protocol's actions differ from the script's ``>`` lines."""


def format_action(a) -> str:
    to = "" if getattr(a, "to", None) is None else f" to={_ints(a.to)}"
    if isinstance(a, SendAnnounce):
        ann = a.announce
        return f"SendAnnounce v={a.version} blocks={ann.block_count} ranks={_ints(ann.ranks)}{to}"
    if isinstance(a, SendContributions):
        return (f"SendContributions v={a.version} counts={_ints(a.block_counts)} "
                f"stripes={a.layout.num_stripes}{to}")
    if isinstance(a, SendVote):
        return f"SendVote v={a.version} ranks={_ints(a.ranks)}{to}"
    if isinstance(a, (SendReport, SendWord)):
        return f"{type(a).__name__} v={a.version}{to}"
    if isinstance(a, Commit):
        return f"Commit v={a.version}"
    return repr(a)


def _format_round(r, tree: bool = False) -> str:
    """One open round as ``state`` prints it: who announced, how many contributions it
    still awaits (``?`` while the layout is unknown), whose votes it holds (with
    ``tree``: which child groups reported, whether it knows v decided)."""
    awaiting = "?" if r.layout is None else str(len(r.expected))
    out = (f"v={r.version} announced={_ints(sorted(r.announces))} awaiting={awaiting} "
           f"votes={_ints(sorted(r.votes))}")
    if tree:
        out += f" reports={_ints(sorted(r.reports))} decided={'yes' if r.decided else 'no'}"
    return out


def _ints(xs) -> str:
    return ",".join(str(x) for x in xs) or "-"


@dataclass
class Cluster:
    """The protocols of every node, and what each node has sent so far."""

    groups: list[tuple[tuple[str, ...], int, int]] = field(default_factory=list)
    protos: dict[str, JobProtocol] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)
    announces: dict[tuple[str, int], Announce] = field(default_factory=dict)
    contributions: dict[tuple[str, int], SendContributions] = field(default_factory=dict)
    votes: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)
    reports: dict[tuple[str, int], bool] = field(default_factory=dict)
    words: dict[tuple[str, int], bool] = field(default_factory=dict)

    def start(self) -> None:
        job_nodes = tuple(n for g, _, _ in self.groups for n in g)
        if len(set(job_nodes)) != len(job_nodes):
            raise ScriptError(f"a node is in two groups: {job_nodes}")
        for group, parity, committed in self.groups:
            for n in group:
                self.protos[n] = JobProtocol(JOB_ID, n, group, job_nodes, parity,
                                             committed_version=committed)

    # -- helpers ----------------------------------------------------------------------
    def proto(self, n: str) -> JobProtocol:
        if n not in self.protos:
            raise ScriptError(f"unknown node {n!r} (nodes: {', '.join(self.protos)})")
        if n in self.dead:
            raise ScriptError(f"{n} is dead")
        return self.protos[n]

    def dests(self, spec: str, among: tuple[str, ...], sender: str | None = None) -> list[str]:
        if spec == "*":
            return [n for n in among if n not in self.dead and n != sender]
        out = spec.split(",")
        for n in out:
            self.proto(n)
            if n not in among:
                raise ScriptError(f"{n} cannot receive this (only {', '.join(among)})")
        return out

    def emit(self, node: str, actions: list, out: list[str]) -> None:
        for a in actions:
            if isinstance(a, SendAnnounce):
                self.announces[(node, a.version)] = a.announce
            elif isinstance(a, SendContributions):
                self.contributions[(node, a.version)] = a
            elif isinstance(a, SendVote):
                self.votes[(node, a.version)] = a.ranks
            elif isinstance(a, SendReport):
                self.reports[(node, a.version)] = True
            elif isinstance(a, SendWord):
                self.words[(node, a.version)] = True
            out.append(f"{node}: {format_action(a)}")

    def sent(self, table: dict, src: str, v: int, what: str):
        if (src, v) not in table:
            raise ScriptError(f"{src} never sent {what} for v={v}")
        return table[(src, v)]

    # -- events -----------------------------------------------------------------------
    def run(self, words: list[str], kw: dict[str, str]) -> list[str]:
        out: list[str] = []
        op = words[0]
        all_nodes = tuple(self.protos)
        if op == "local":
            (n,) = words[1:]
            spec = kw.get("ranks", "-")
            ranks = tuple(int(r) for r in spec.split(",")) if spec != "-" else ()
            acts = self.proto(n).local_data_complete(
                int(kw["v"]), int(kw["blocks"]), ranks, tuple(b"manifest-%d" % r for r in ranks))
            self.emit(n, acts, out)
        elif op in ("announce", "vote", "report", "word"):
            dests, arrow, src = words[1:]
            if arrow != "<-":
                raise ScriptError(f"expected '{op} DESTS <- SRC'")
            v = int(kw["v"])
            sender = self.proto(src)
            if op == "announce":
                ann = self.sent(self.announces, src, v, "an announce")
                for d in self.dests(dests, sender.group, src):
                    self.emit(d, self.proto(d).announce_received(v, ann), out)
            elif op == "vote":  # "*": the group; a named node elsewhere must ignore it
                ranks = self.sent(self.votes, src, v, "a vote")
                for d in (self.dests(dests, sender.group, src) if dests == "*"
                          else self.dests(dests, all_nodes, src)):
                    self.emit(d, self.proto(d).step_received(v, src, "vote", ranks), out)
            else:
                table, among = ((self.reports, sender.parent_nodes) if op == "report"
                                else (self.words, sender.child_nodes))
                self.sent(table, src, v, f"a {op}")
                for d in self.dests(dests, among, src):
                    self.emit(d, self.proto(d).step_received(v, src, op), out)
        elif op == "contribs":
            (src,) = words[1:]
            v = int(kw["v"])
            sender = self.proto(src)
            sc = self.sent(self.contributions, src, v, "contributions")
            allowed = self.dests(kw.get("to", "*"), sender.group, src)
            layout = sc.layout
            for _j, s, p in layout.data_blocks(sender.my_index):
                for t, holder in enumerate(layout.stripe_nodes(s)[1]):
                    d = sender.group[holder]
                    if d in allowed and d not in self.dead:
                        self._contrib(d, v, sc, s, t, p, out)
        elif op == "contrib":
            d, arrow, src = words[1:]
            if arrow != "<-":
                raise ScriptError("expected 'contrib DEST <- SRC'")
            v = int(kw["v"])
            self.proto(src)
            sc = self.sent(self.contributions, src, v, "contributions")
            self._contrib(d, v, sc, int(kw["s"]), int(kw["t"]), int(kw["p"]), out)
        elif op == "delivered":
            (n,) = words[1:]
            self.emit(n, self.proto(n).contributions_delivered(int(kw["v"])), out)
        elif op == "ack":
            src, arrow, dests = words[1:]
            if arrow != "<-":
                raise ScriptError("expected 'ack N <- DESTS what=W'")
            v, what = int(kw["v"]), kw["what"]
            table = {"announce": self.announces, "contrib": self.contributions, "vote": self.votes,
                     "report": self.reports, "word": self.words}
            self.sent(table[what], src, v, f"a {what}")
            for d in self.dests(dests, all_nodes, src):
                self.emit(src, self.proto(src).delivered(v, what, d), out)
        elif op == "resend":
            (n,) = words[1:]
            self.emit(n, self.proto(n).resend(int(kw["v"])), out)
        elif op == "gossip":
            for d in self.dests(words[1], all_nodes):
                self.emit(d, self.proto(d).committed_elsewhere(int(kw["v"])), out)
        elif op == "fence":
            for d in self.dests(words[1], all_nodes):
                out.append(f"{d}: Fenced dropped={_ints(self.proto(d).fence())}")
        elif op == "kill":
            (n,) = words[1:]
            self.proto(n)
            self.dead.add(n)
        elif op == "state":
            for d in self.dests(words[1], all_nodes):
                jp = self.proto(d)
                tree = len(jp.groups) > 1
                out.append(" | ".join([f"{d}: committed={jp.committed_version}"] + [
                    _format_round(jp.rounds[v], tree) for v in sorted(jp.rounds)]))
        else:
            raise ScriptError(f"unknown event {op!r}")
        return out

    def _contrib(self, d: str, v: int, sc: SendContributions, s: int, t: int, p: int,
                 out: list[str]) -> None:
        jp = self.proto(d)
        jp.layout_from_contribution(v, sc.block_counts)
        self.emit(d, jp.contribution_received(v, s, t, p), out)


def _parse(line: str) -> tuple[list[str], dict[str, str]]:
    words, kw = [], {}
    for tok in line.split():
        if "=" in tok:
            k, _, val = tok.partition("=")
            kw[k] = val
        else:
            words.append(tok)
    return words, kw


def run_script(text: str, name: str = "<script>", rewrite: bool = False) -> str:
    """Run a script; raise :class:`ScriptMismatch` at the first event whose actions differ
    from its ``>`` lines (or :class:`ScriptError`). With ``rewrite``, return the script
    with the ``>`` lines replaced by what the protocol produced instead."""
    lines = text.splitlines()
    cluster = Cluster()
    started = False
    rewritten: list[str] = []
    i = 0
    while i < len(lines):
        raw = lines[i]
        body = raw.split("#", 1)[0].strip()
        i += 1
        if body.startswith(">"):
            raise ScriptError(f"{name}:{i}: a '>' line with no event above it")
        if not body:
            rewritten.append(raw)
            continue
        rewritten.append(raw)
        words, kw = _parse(body)
        where = f"{name}:{i}: {body}"
        if words[0] == "group":
            if started:
                raise ScriptError(f"{where}: groups come before the first event")
            cluster.groups.append(
                (tuple(words[1:]), int(kw["parity"]), int(kw.get("committed", 0))))
            continue
        if not started:
            cluster.start()
            started = True
        expected = []
        while i < len(lines) and lines[i].strip().startswith(">"):
            expected.append(lines[i].split("#", 1)[0].strip()[1:].strip())
            i += 1
        try:
            got = cluster.run(words, kw)
        except (KeyError, ValueError) as exc:
            raise ScriptError(f"{where}: bad event ({exc!r})") from None
        except ScriptError as exc:
            raise ScriptError(f"{where}: {exc}") from None
        if rewrite:
            rewritten.extend(f"> {g}" for g in got)
        elif got != expected:
            diff = "\n".join(difflib.unified_diff(
                [f"> {e}" for e in expected], [f"> {g}" for g in got],
                "expected (script)", "got (protocol)", lineterm=""))
            raise ScriptMismatch(f"{where}\n{diff}")
    return "\n".join(rewritten) + "\n"


# -- the tests ----------------------------------------------------------------------------------
SCRIPTS = sorted(TESTDATA.glob("*.txt"))


def test_the_scripts_are_there():
    names = {p.stem for p in SCRIPTS}
    assert {"clean_commit", "clean_commit_m2", "two_groups", "contributions_before_announces",
            "lost_voter", "half_broadcast", "late_vote", "restart", "torn_version",
            "resend_until_acknowledged", "tree_member_dies_before_reporting", "tree_path_fails_over",
            "tree_root_dies_after_deciding", "tree_missed_word", "tree_incomplete_elsewhere"} <= names, names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_script(path):
    run_script(path.read_text(), path.name)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_every_expected_line_is_checked(path):
    """Drop each '>' line in turn: every script must fail on each one."""
    lines = path.read_text().splitlines()
    outputs = [i for i, ln in enumerate(lines) if ln.strip().startswith(">")]
    assert outputs, f"{path.name} expects nothing"
    for i in outputs:
        broken = "\n".join(lines[:i] + lines[i + 1:])
        with pytest.raises(ScriptMismatch):
            run_script(broken, path.name)


WRONG = """\
group n0 n1 parity=1
local n0 v=1 blocks=1 ranks=0
> n0: SendAnnounce v=1 blocks=1 ranks=0
local n1 v=1 blocks=1 ranks=1
> n1: SendAnnounce v=1 blocks=1 ranks=1
announce n1 <- n0 v=1
> n1: SendContributions v=1 counts=1,1 stripes=2
> n1: Commit v=1
"""


def test_a_wrong_script_is_reported_with_a_diff():
    with pytest.raises(ScriptMismatch) as ei:
        run_script(WRONG, "wrong.txt")
    msg = str(ei.value)
    assert msg.startswith("wrong.txt:6: announce n1 <- n0 v=1"), msg
    assert "-> n1: Commit v=1" in msg, msg  # expected, not produced
    assert "> n1: SendContributions v=1 counts=1,1 stripes=2" in msg, msg


def test_a_wrong_action_is_reported():
    text = WRONG.replace("> n1: Commit v=1\n", "").replace("counts=1,1", "counts=1,2")
    with pytest.raises(ScriptMismatch) as ei:
        run_script(text, "wrong.txt")
    assert "-> n1: SendContributions v=1 counts=1,2" in str(ei.value)
    assert "+> n1: SendContributions v=1 counts=1,1" in str(ei.value)


def test_a_message_never_sent_cannot_be_delivered():
    text = "group n0 n1 parity=1\nvote n1 <- n0 v=1\n"
    with pytest.raises(ScriptError, match="n0 never sent a vote for v=1"):
        run_script(text, "wrong.txt")
    text = "group n0 n1 parity=1\nkill n1\nlocal n1 v=1 blocks=1 ranks=1\n"
    with pytest.raises(ScriptError, match="n1 is dead"):
        run_script(text, "wrong.txt")


def test_the_right_lines_pass():
    fixed = WRONG.replace("> n1: Commit v=1\n", "")
    run_script(fixed, "fixed.txt")


if __name__ == "__main__":  # print a script with the '>' lines the protocol produces
    for arg in sys.argv[1:]:
        sys.stdout.write(run_script(Path(arg).read_text(), arg, rewrite=True))
