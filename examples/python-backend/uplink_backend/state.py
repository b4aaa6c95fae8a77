"""What the backend knows, in memory: providers, agents, commands, and the
delivery state of each agent (command seq and ack, event epochs, metric
batch windows). Pure bookkeeping: no network here. Every rule cites the
contract (proto/uplink/v1/*.proto, docs/PROTOCOL.md)."""

import asyncio
import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field

# Limits the contract writes down (docs/PROTOCOL.md, "Every limit").
MAX_ACK = 1 << 53
MAX_EVENTS = 10_000
METRIC_SEQ_WINDOW = 100_000
MAX_POLL_COMMANDS = 256
ORDERED_EPOCHS = 1 << 63
PRESENCE_GRACE_MS = 5_000
ENROLL_KEY_MS = 24 * 3600 * 1000
INFO_LIMITS = {"hostname": 255, "version": 64, "os": 64, "arch": 64, "transport_reason": 256}
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
# What this in-memory backend holds at most.
MAX_AGENTS = 10_000
MAX_PENDING = 10_000  # commands of one agent not yet acknowledged
MAX_COMMANDS = 100_000  # commands kept; the oldest finished go first
MAX_SERIES = 100_000  # series at /metrics; new ones beyond are dropped


def now_ms():
    return int(time.time() * 1000)


def digest(secret):
    """What is stored of a token or credential: its SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()


class Refused(Exception):
    """A call the contract refuses: `code` is the Connect code's name."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


@dataclass
class Command:
    id: str
    agent_id: str
    seq: int
    spec: object
    created_ms: int
    accepted_ms: int = 0
    done_ms: int = 0
    result: object = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Agent:
    id: str
    provider: str
    hostname: str
    version: str
    enrolled_ms: int
    credential: str  # digest
    pending_credential: str = ""  # digest of a rotated credential not yet used
    revoked_ms: int = 0
    transport: int = 0  # admin.proto Transport
    transport_reason: str = ""
    last_seen_ms: int = 0
    streams: int = 0
    polls: int = 0
    next_seq: int = 1
    acked: int = 0
    commands: dict = field(default_factory=dict)  # seq -> Command
    events: dict = field(default_factory=dict)  # epoch -> acked event seq
    newest_epoch: int = 0  # newest ordered epoch (>= 2^63) with events
    batches: dict = field(default_factory=dict)  # epoch -> [watermark, set above]
    capacity: object = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self):
        """Wakes every stream and held poll of the agent."""
        self.wake.set()
        self.wake = asyncio.Event()

    def connected(self, now):
        if self.revoked_ms or not self.hostname:
            return False
        return self.streams > 0 or self.polls > 0 or now - self.last_seen_ms <= PRESENCE_GRACE_MS

    def above(self, seq, limit=MAX_POLL_COMMANDS):
        """Commands above `seq` in seq order."""
        return [self.commands[s] for s in range(seq + 1, self.next_seq) if s in self.commands][:limit]


def check_info(info, at_enroll):
    """`AgentInfo`'s rules: lengths, no control characters; hostname and
    version required at Enroll."""
    for name, limit in INFO_LIMITS.items():
        value = getattr(info, name) if info is not None else ""
        if len(value.encode()) > limit:
            raise Refused("invalid_argument", f"info.{name} is over {limit} bytes")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise Refused("invalid_argument", f"info.{name} has control characters")
    if at_enroll:
        for name in ("hostname", "version"):
            if not (getattr(info, name) if info is not None else "").strip():
                raise Refused("invalid_argument", f"info.{name} is required at Enroll")


class State:
    def __init__(self, enroll_token):
        self.providers = {"default": digest(enroll_token)}
        self.agents = {}
        self.commands = {}
        self.enroll_keys = {}  # (provider, key) -> (agent id, first answer ms)
        self.by_digest = {}  # credential digest (current or rotated) -> agent id
        self.samples = 0
        self.latest = {}  # (agent, series) -> (time, value)

    # Enrollment and credentials.

    def enroll(self, token, info, key):
        provider = next((p for p, h in self.providers.items() if secrets.compare_digest(h, digest(token))), None)
        if provider is None:
            raise Refused("unauthenticated", "unknown enrollment token")
        check_info(info, at_enroll=True)
        if key and not IDEMPOTENCY_KEY.match(key):
            raise Refused("invalid_argument", "idempotency_key: use 16 to 128 characters of A-Z a-z 0-9 _ -")
        credential = "upl_c_" + secrets.token_hex(32)
        now = now_ms()
        if len(self.agents) >= MAX_AGENTS:
            raise Refused("resource_exhausted", f"this backend holds at most {MAX_AGENTS} agents")
        known = self.enroll_keys.get((provider, key)) if key else None
        if known and now - known[1] <= ENROLL_KEY_MS:
            agent = self.agents.get(known[0])
            if agent and not agent.revoked_ms:
                # A retry: same agent, a new credential; the one answered
                # before (never received) stops working.
                self.set_credential(agent, digest(credential))
                return agent, credential
        agent = Agent(
            id="agt_" + secrets.token_hex(8),
            provider=provider,
            hostname=info.hostname,
            version=info.version,
            enrolled_ms=now,
            credential=digest(credential),
        )
        self.agents[agent.id] = agent
        self.by_digest[agent.credential] = agent.id
        if key:
            self.enroll_keys[(provider, key)] = (agent.id, now)
        return agent, credential

    def authenticate(self, authorization):
        """The agent whose credential `authorization` carries."""
        if not authorization.startswith("Bearer ") or len(authorization) > 512:
            raise Refused("unauthenticated", "send the agent's credential as authorization: Bearer <credential>")
        d = digest(authorization[len("Bearer "):].strip())
        agent = self.agents.get(self.by_digest.get(d, ""))
        if agent is None:
            raise Refused("unauthenticated", "unknown credential")
        if d == agent.pending_credential:
            # A rotated credential's first use retires the old one.
            self.set_credential(agent, d)
        if agent.revoked_ms:
            raise Refused("unauthenticated", f"agent {agent.id} is revoked")
        return agent

    def set_credential(self, agent, d):
        """Makes `d` the agent's only credential."""
        for old in (agent.credential, agent.pending_credential):
            self.by_digest.pop(old, None)
        agent.credential, agent.pending_credential = d, ""
        self.by_digest[d] = agent.id

    def rotate(self, agent):
        credential = "upl_c_" + secrets.token_hex(32)
        # Calling again replaces a rotated credential never used.
        self.by_digest.pop(agent.pending_credential, None)
        agent.pending_credential = digest(credential)
        self.by_digest[agent.pending_credential] = agent.id
        return credential

    def revoke(self, agent_id):
        agent = self.agent(agent_id)
        if not agent.revoked_ms:
            agent.revoked_ms = now_ms()
        agent.notify()
        return agent.revoked_ms

    def agent(self, agent_id):
        agent = self.agents.get(agent_id)
        if agent is None:
            raise Refused("not_found", f"no agent {agent_id!r}")
        return agent

    # Commands: seq and ack.

    def heard(self, agent, info, transport):
        """A call of the agent itself (not an anonymous diagnostic call)."""
        if info is not None and (info.hostname or info.version):
            agent.hostname, agent.version = info.hostname, info.version
            agent.transport, agent.transport_reason = transport, info.transport_reason
            agent.last_seen_ms = now_ms()
            return True
        return False

    def apply_ack(self, agent, ack):
        if ack > MAX_ACK:
            raise Refused("invalid_argument", f"ack {ack} is above 2^53")
        now = now_ms()
        if ack > agent.next_seq - 1:
            # Seqs this backend never issued (it lost state): take the
            # agent's word and number new commands above its ack.
            agent.next_seq = ack + 1
        if ack > agent.acked:
            for seq in range(agent.acked + 1, ack + 1):
                cmd = agent.commands.get(seq)
                if cmd and not cmd.accepted_ms:
                    cmd.accepted_ms = now
            agent.acked = ack

    def enqueue(self, agent_id, spec):
        agent = self.agent(agent_id)
        if agent.revoked_ms:
            raise Refused("failed_precondition", f"agent {agent_id} is revoked")
        if spec is None or spec.kind is None:
            raise Refused("invalid_argument", "spec: set one kind of command")
        if agent.next_seq - 1 - agent.acked >= MAX_PENDING:
            raise Refused("resource_exhausted", f"agent {agent_id} has {MAX_PENDING} commands not yet acknowledged")
        if len(self.commands) >= MAX_COMMANDS:
            self.forget_finished()
        cmd = Command(
            id="cmd_" + secrets.token_hex(8),
            agent_id=agent.id,
            seq=agent.next_seq,
            spec=spec,
            created_ms=now_ms(),
        )
        agent.next_seq += 1
        agent.commands[cmd.seq] = cmd
        self.commands[cmd.id] = cmd
        agent.notify()
        return cmd

    def forget_finished(self):
        """Drops the older half of the finished commands."""
        done = sorted((c for c in self.commands.values() if c.done_ms), key=lambda c: c.done_ms)
        for c in done[: len(done) // 2 + 1]:
            del self.commands[c.id]
            self.agents[c.agent_id].commands.pop(c.seq, None)
        if len(self.commands) >= MAX_COMMANDS:
            raise Refused("resource_exhausted", f"this backend holds at most {MAX_COMMANDS} commands")

    def command(self, command_id):
        cmd = self.commands.get(command_id)
        if cmd is None:
            raise Refused("not_found", f"no command {command_id!r}")
        return cmd

    # Events: epochs and seqs (ReportRequest).

    def report(self, agent, epoch, events):
        if not events:
            return agent.events.get(epoch, 0)
        if len(events) > MAX_EVENTS:
            raise Refused("invalid_argument", f"{len(events)} events: at most {MAX_EVENTS} per Report")
        for i, e in enumerate(events):
            if e.seq == 0:
                raise Refused("invalid_argument", f"events[{i}] has seq 0; seqs start at 1")
            if i and e.seq != events[i - 1].seq + 1:
                raise Refused("invalid_argument", f"events[{i}] has seq {e.seq}; seqs must be consecutive")
        if epoch >= ORDERED_EPOCHS and epoch < agent.newest_epoch:
            raise Refused(
                "failed_precondition",
                f"epoch {epoch} is older than this agent's newest, {agent.newest_epoch}: epochs must increase; take a new one",
            )
        acked = agent.events.get(epoch, 0)
        if events[0].seq > acked + 1:
            raise Refused(
                "failed_precondition",
                f"events from seq {events[0].seq} of epoch {epoch} leave a gap: the next one expected is {acked + 1}",
            )
        now = now_ms()
        for e in events:
            if e.seq <= acked:
                continue  # a retry of a stored event
            kind = e.kind
            if kind is not None and kind.field == "result":
                cmd = self.commands.get(kind.value.command_id)
                if cmd is not None and cmd.agent_id == agent.id and not cmd.done_ms:
                    cmd.done_ms, cmd.result = now, kind.value
                    cmd.accepted_ms = cmd.accepted_ms or now
                    cmd.done.set()
            elif kind is not None and kind.field == "capacity":
                agent.capacity = kind.value
            acked = e.seq
        agent.events[epoch] = acked
        if epoch >= ORDERED_EPOCHS:
            agent.newest_epoch = max(agent.newest_epoch, epoch)
        return acked

    # Metric batches: once per (agent, epoch, seq), in any order within a
    # window (PushMetricsRequest.seq).

    def batch_state(self, agent, epoch, seq):
        """"seen", "new", or the watermark when the seq is too far ahead."""
        watermark, above = agent.batches.get(epoch, (0, set()))
        if seq <= watermark or seq in above:
            return "seen"
        if seq > watermark + METRIC_SEQ_WINDOW:
            return watermark
        return "new"

    def record_batch(self, agent, epoch, seq):
        state = agent.batches.setdefault(epoch, [0, set()])
        state[1].add(seq)
        while state[0] + 1 in state[1]:
            state[0] += 1
            state[1].discard(state[0])

    def store_samples(self, agent, samples):
        for s in samples:
            key = (agent.id, s.series)
            old = self.latest.get(key)
            if old is None and len(self.latest) >= MAX_SERIES:
                continue
            if old is None or old[0] <= s.time_unix_ms:
                self.latest[key] = (s.time_unix_ms, s.value)
        self.samples += len(samples)
