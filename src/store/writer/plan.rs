//! Planning a batch, in memory and without I/O: each append checked in queue order against the
//! stream versions as its batch-mates leave them (a conflict fails alone), retries recognised by
//! idempotency key or client event ids, and the rows laid out column by column for the one
//! statement that writes them. Also the writer's memory of the database between commits, which
//! lets a batch be planned without reading first.

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    fmt::Write as _,
    time::SystemTime,
};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::query::split_tags;
use crate::store::{
    AppendCommand, AppendOutcome, PartOutcome, Payload, StreamState, db::JsonRef, ids::AssignedIds,
    partition_key,
};

/// Most streams remembered (beyond it the memory starts afresh).
pub(super) const REMEMBERED_STREAMS: usize = 100_000;
/// Most recent events remembered for append conditions.
pub(super) const REMEMBERED_EVENTS: usize = 20_000;

/// An event the writer wrote, as an append condition looks at it.
pub(super) struct RecentEvent {
    seq: u64,
    event_type: String,
    tags: Option<String>,
}

/// What the writer knows of the database from its own transactions (and, while batches are in
/// flight, what it will know once they commit).
#[derive(Default)]
pub(super) struct Memory {
    /// The log head after the last transaction, if known.
    pub(super) head: Option<u64>,
    /// Stream versions and states as last seen or written.
    pub(super) streams: HashMap<String, (u64, StreamState)>,
    /// No one-round-trip attempt before this.
    pub(super) rest_until: Option<std::time::Instant>,
    /// The events this writer wrote, oldest first, every sequence from `recent_from` on: while
    /// the memory holds, nobody else wrote (a one-round-trip commit proves the head it was
    /// planned from), so an append condition after `recent_from - 1` is checked here.
    pub(super) recent: VecDeque<RecentEvent>,
    pub(super) recent_from: Option<u64>,
    /// Whether appends with conditions have come: only then are events remembered (copying
    /// every event's type and tags would tax the append path of a store that never uses them).
    pub(super) conditions_used: bool,
}

impl Memory {
    pub(super) fn forget(&mut self) {
        self.head = None;
        self.streams.clear();
        self.recent.clear();
        self.recent_from = None;
    }

    /// Events written (or about to be, by a batch planned on this memory) from `first` on, in
    /// sequence order. Not following the events remembered, they start the memory afresh.
    pub(super) fn wrote<'a>(
        &mut self,
        first: u64,
        events: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) {
        if !self.conditions_used {
            return;
        }
        let next = self.recent.back().map(|e| e.seq + 1).or(self.recent_from);
        if next != Some(first) {
            self.recent.clear();
            self.recent_from = Some(first);
        }
        for (i, (event_type, tags)) in events.into_iter().enumerate() {
            self.recent.push_back(RecentEvent {
                seq: first + i as u64,
                event_type: event_type.to_owned(),
                tags: tags.map(str::to_owned),
            });
        }
        while self.recent.len() > REMEMBERED_EVENTS {
            self.recent.pop_front();
        }
        if let Some(front) = self.recent.front() {
            self.recent_from = Some(front.seq);
        }
    }

    /// The first remembered event after `after` that matches `query`: `Some(None)` when none
    /// does and the memory covers everything after `after`; `None` when it does not.
    fn conflict_in_memory(&self, c: &crate::store::AppendCondition) -> Option<Option<u64>> {
        let from = self.recent_from?;
        if c.after + 1 < from {
            return None;
        }
        Some(
            self.recent
                .iter()
                .find(|e| {
                    e.seq > c.after
                        && c.query
                            .matches(&e.event_type, split_tags(e.tags.as_deref()))
                })
                .map(|e| e.seq),
        )
    }

    pub(super) fn remember(
        &mut self,
        head: u64,
        streams: impl IntoIterator<Item = (String, (u64, StreamState))>,
    ) {
        if self.streams.len() > REMEMBERED_STREAMS {
            self.streams.clear();
        }
        // A head read from the database: events up to it that the writer did not write are not
        // remembered, so the remembered run of events starts after it unless it reaches it.
        let next = self.recent.back().map(|e| e.seq + 1).or(self.recent_from);
        if next != Some(head + 1) {
            self.recent.clear();
            self.recent_from = Some(head + 1);
        }
        self.head = Some(head);
        self.streams.extend(streams);
    }

    /// A stream as just written (a stream already remembered costs no allocation).
    pub(super) fn set(&mut self, stream: &str, version: (u64, StreamState)) {
        match self.streams.get_mut(stream) {
            Some(v) => *v = version,
            None => {
                self.streams.insert(stream.to_owned(), version);
            }
        }
    }

    /// Notes whether `cmds` carry conditions: from the first, the events written are remembered.
    pub(super) fn note_conditions(&mut self, cmds: &[&AppendCommand]) {
        if !self.conditions_used && cmds.iter().any(|c| c.condition.is_some()) {
            self.conditions_used = true;
        }
    }

    /// A snapshot to plan `cmds` from without reading, if every stream is remembered.
    pub(super) fn snapshot(&self, cmds: &[&AppendCommand]) -> Option<Snapshot> {
        let head = self.head?;
        if self
            .rest_until
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return None;
        }
        let mut streams = HashMap::new();
        for p in cmds.iter().flat_map(|c| &c.parts) {
            let s = self.streams.get(p.stream_id.as_str())?;
            streams.insert(p.stream_id.clone(), *s);
        }
        let mut conflicts = HashMap::new();
        let mut checked = Vec::new();
        for (i, c) in cmds.iter().enumerate() {
            if let Some(cond) = &c.condition
                && let Some(conflict) = self.conflict_in_memory(cond)
            {
                checked.push(i);
                if let Some(seq) = conflict {
                    conflicts.insert(i, seq);
                }
            }
        }
        Some(Snapshot {
            head,
            streams,
            event_ids: HashMap::new(),
            keys: HashMap::new(),
            conflicts,
            checked,
        })
    }
}

/// Where an already-stored event or keyed append sits.
#[derive(Clone)]
pub(super) struct Stored {
    pub(super) stream_id: String,
    pub(super) version: u64,
    pub(super) seq: u64,
}

/// What phase 1 read under the lock.
pub(super) struct Snapshot {
    pub(super) head: u64,
    pub(super) streams: HashMap<String, (u64, StreamState)>,
    pub(super) event_ids: HashMap<Uuid, Stored>,
    pub(super) keys: HashMap<String, Keyed>,
    /// For each conditional append (by its index in the batch), the first stored event that
    /// fails its condition, if any.
    pub(super) conflicts: HashMap<usize, u64>,
    /// The conditional appends whose conditions were checked in full against what the writer
    /// remembers (the others are checked by `append_batch`).
    pub(super) checked: Vec<usize>,
}

/// What an idempotency key recorded: the streams the append wrote and its result.
#[derive(Clone)]
pub(super) struct Keyed {
    pub(super) streams: Vec<String>,
    pub(super) outcome: AppendOutcome,
}

/// Separates the parts of a multi-stream append in an idempotency key's `stream_id` column, and
/// [`FIELD_SEPARATOR`] the fields of a part: neither can appear in a stream id (no control
/// characters), so a one-stream append's row (the stream id alone, as every release wrote it)
/// and a multi-stream one's never look alike.
const PART_SEPARATOR: char = '\u{1e}';
const FIELD_SEPARATOR: char = '\u{1f}';

impl Keyed {
    /// The `stream_id` column of the key row recording `outcome` of `cmd`: the stream id for an
    /// append to one stream; for several, each part's stream, version and sequences.
    pub(super) fn stream_column<'a>(
        cmd: &'a AppendCommand,
        outcome: &AppendOutcome,
    ) -> Cow<'a, str> {
        if let [part] = cmd.parts.as_slice() {
            return Cow::Borrowed(&part.stream_id);
        }
        let mut s = String::new();
        for (i, (part, o)) in cmd.parts.iter().zip(&outcome.parts).enumerate() {
            if i > 0 {
                s.push(PART_SEPARATOR);
            }
            let f = FIELD_SEPARATOR;
            let _ = write!(
                s,
                "{}{f}{}{f}{}{f}{}",
                part.stream_id, o.version, o.first_sequence, o.last_sequence
            );
        }
        Cow::Owned(s)
    }

    /// A key row read back. A `stream_id` column this release cannot read (a later release's
    /// form) is taken as one stream of that name: no request can name it (it holds control
    /// characters), so the key counts as used by another append, never as a retry.
    pub(super) fn from_row(stream: String, version: u64, first: u64, last: u64) -> Keyed {
        let one = |stream: String| Keyed {
            outcome: AppendOutcome {
                parts: vec![PartOutcome {
                    version,
                    first_sequence: first,
                    last_sequence: last,
                }],
                duplicate: true,
            },
            streams: vec![stream],
        };
        if !stream.contains(PART_SEPARATOR) {
            return one(stream);
        }
        let parsed: Option<(Vec<String>, Vec<PartOutcome>)> = stream
            .split(PART_SEPARATOR)
            .map(|part| {
                let mut f = part.split(FIELD_SEPARATOR);
                let (Some(id), Some(v), Some(a), Some(b), None) =
                    (f.next(), f.next(), f.next(), f.next(), f.next())
                else {
                    return None;
                };
                let outcome = PartOutcome {
                    version: v.parse().ok()?,
                    first_sequence: a.parse().ok()?,
                    last_sequence: b.parse().ok()?,
                };
                Some((id.to_owned(), outcome))
            })
            .collect::<Option<Vec<_>>>()
            .map(|parts| parts.into_iter().unzip());
        match parsed {
            Some((streams, parts)) => Keyed {
                streams,
                outcome: AppendOutcome {
                    parts,
                    duplicate: true,
                },
            },
            None => one(stream),
        }
    }
}

/// The rows of one transaction, column by column.
/// Columns borrow from the appends: payloads are not copied on their way to the database.
#[derive(Default)]
pub(super) struct Rows<'a> {
    pub(super) seq: Vec<i64>,
    pub(super) stream_id: Vec<&'a str>,
    pub(super) version: Vec<i64>,
    pub(super) event_id: Vec<Uuid>,
    pub(super) event_type: Vec<&'a str>,
    pub(super) content_type: Vec<&'a str>,
    pub(super) data: Vec<Option<JsonRef<'a>>>,
    pub(super) data_bytes: Vec<Option<&'a [u8]>>,
    pub(super) metadata: Vec<Option<JsonRef<'a>>>,
    pub(super) created_at: Vec<Option<SystemTime>>,
    pub(super) partition_key: Vec<i64>,
    pub(super) tags: Vec<Option<&'a str>>,
    /// Each stream written, once, with its final version.
    pub(super) upsert_stream: Vec<&'a str>,
    pub(super) upsert_version: Vec<i64>,
}

/// The idempotency keys to record, column by column.
#[derive(Default)]
pub(super) struct Keys<'a> {
    pub(super) key: Vec<&'a str>,
    pub(super) stream_id: Vec<Cow<'a, str>>,
    pub(super) version: Vec<i64>,
    pub(super) first: Vec<i64>,
    pub(super) last: Vec<i64>,
}

/// Phase 3's rows and keys: the events of every append that `results` say are written (a new,
/// successful outcome), at the sequences and versions the outcomes give.
pub(super) fn lay_out<'a>(
    cmds: &[&'a AppendCommand],
    results: &[Result<AppendOutcome>],
    ids: AssignedIds,
) -> (Rows<'a>, Keys<'a>) {
    let mut rows = Rows::default();
    let mut keys = Keys::default();
    let mut upserted: HashMap<&str, usize> = HashMap::new();
    for (cmd, result) in cmds.iter().zip(results) {
        let Ok(o) = result else { continue };
        if o.duplicate {
            continue;
        }
        for (part, po) in cmd.parts.iter().zip(&o.parts) {
            let first_version = po.version + 1 - part.events.len() as u64;
            let pk = i64::from(partition_key(&part.stream_id));
            for (i, e) in part.events.iter().enumerate() {
                let seq = po.first_sequence + i as u64;
                rows.seq.push(seq as i64);
                rows.stream_id.push(&part.stream_id);
                rows.version.push((first_version + i as u64) as i64);
                rows.event_id.push(if cmd.client_event_ids {
                    e.event_id
                } else {
                    ids.id(seq)
                });
                rows.event_type.push(&e.event_type);
                rows.content_type.push(&e.content_type);
                match &e.payload {
                    Payload::Json(s) => {
                        rows.data.push(Some(JsonRef(s)));
                        rows.data_bytes.push(None);
                    }
                    Payload::Bytes(b) => {
                        rows.data.push(None);
                        rows.data_bytes.push(Some(b));
                    }
                }
                rows.metadata.push(e.metadata.as_deref().map(JsonRef));
                rows.created_at.push(e.timestamp);
                rows.partition_key.push(pk);
                rows.tags.push(e.tags.as_deref());
            }
            match upserted.get(part.stream_id.as_str()) {
                Some(&i) => rows.upsert_version[i] = po.version as i64,
                None => {
                    upserted.insert(&part.stream_id, rows.upsert_stream.len());
                    rows.upsert_stream.push(&part.stream_id);
                    rows.upsert_version.push(po.version as i64);
                }
            }
        }
        if let Some(key) = cmd.idempotency_key.as_deref() {
            keys.key.push(key);
            keys.stream_id.push(Keyed::stream_column(cmd, o));
            keys.version.push(o.version() as i64);
            keys.first.push(o.first_sequence() as i64);
            keys.last.push(o.last_sequence() as i64);
        }
    }
    (rows, keys)
}

/// What one planning pass decided.
pub(super) struct Plan<'a> {
    /// Each append's result, in queue order.
    pub(super) results: Vec<Result<AppendOutcome>>,
    /// The head after the batch.
    pub(super) new_head: u64,
    /// Each stream written, with its version after the batch.
    pub(super) streams: Vec<(&'a str, u64)>,
}

impl Plan<'_> {
    /// Whether every append is written as new: the batch can go the one-round-trip way.
    pub(super) fn clean(&self) -> bool {
        !self.results.is_empty()
            && self
                .results
                .iter()
                .all(|r| r.as_ref().is_ok_and(|o| !o.duplicate))
    }
}

/// Phase 2 in memory: checks each append in order against the snapshot and its batch-mates.
/// An append to several streams is checked whole before any of it counts: one part failing
/// fails the append, and its batch-mates see none of it.
pub(super) fn plan<'a>(cmds: &[&'a AppendCommand], snap: &Snapshot, ids: AssignedIds) -> Plan<'a> {
    let mut results = Vec::with_capacity(cmds.len());
    let mut streams: HashMap<&str, (u64, StreamState)> = HashMap::new();
    let mut batch_ids: HashMap<Uuid, Stored> = HashMap::new();
    let mut batch_keys: HashMap<&str, Keyed> = HashMap::new();
    let mut touched: Vec<&str> = Vec::new();
    let mut next_seq = snap.head + 1;
    // The events planned so far (sequence, type, tags), kept only when a condition may need them.
    let conditional = cmds.iter().any(|c| c.condition.is_some());
    let mut planned: Vec<(u64, &str, Option<&str>)> = Vec::new();

    for (index, cmd) in cmds.iter().enumerate() {
        // A retry by idempotency key.
        if let Some(key) = cmd.idempotency_key.as_deref() {
            let prior = batch_keys.get(key).or_else(|| snap.keys.get(key));
            if let Some(prior) = prior {
                results.push(if cmd.writes(prior.streams.iter().map(String::as_str)) {
                    Ok(AppendOutcome {
                        duplicate: true,
                        ..prior.outcome.clone()
                    })
                } else {
                    Err(Error::IdempotencyKeyConflict {
                        key: key.to_owned(),
                        streams: prior.streams.clone(),
                    })
                });
                continue;
            }
        }
        // A retry by event ids.
        if cmd.client_event_ids
            && let Some(r) = retry_by_event_ids(cmd, &snap.event_ids, &batch_ids)
        {
            results.push(r);
            continue;
        }
        // An id of this store's own form that no stored event has would be given again to the
        // event at its sequence.
        if cmd.client_event_ids
            && let Some((field, e)) = cmd.parts.iter().enumerate().find_map(|(p, part)| {
                let (i, e) = part
                    .events
                    .iter()
                    .enumerate()
                    .find(|(_, e)| ids.seq(&e.event_id).is_some())?;
                let field = if cmd.parts.len() == 1 {
                    format!("events[{i}].event_id")
                } else {
                    format!("parts[{p}].events[{i}].event_id")
                };
                Some((field, e))
            })
        {
            results.push(Err(Error::invalid(
                field,
                format!(
                    "{} is of the form this store gives the events it assigns ids to, \
                     and no stored event has it",
                    e.event_id
                ),
            )));
            continue;
        }
        // Every part's stream, as the appends before this one leave it.
        let check = cmd.parts.iter().find_map(|part| {
            let (version, state) = *streams.entry(part.stream_id.as_str()).or_insert_with(|| {
                snap.streams
                    .get(part.stream_id.as_str())
                    .copied()
                    .unwrap_or((0, StreamState::Active))
            });
            if state != StreamState::Active {
                Some(Error::StreamState {
                    stream_id: part.stream_id.clone(),
                    state,
                    operation: "append",
                })
            } else if !part.expected.admits(version) {
                Some(Error::WrongExpectedVersion {
                    stream_id: part.stream_id.clone(),
                    expected: part.expected,
                    actual: version,
                })
            } else {
                None
            }
        });
        if let Some(e) = check {
            results.push(Err(e));
            continue;
        }
        if let Some(c) = &cmd.condition {
            // Stored events first (they all precede this batch's), then those of the appends
            // planned before this one in the batch.
            let conflict = snap.conflicts.get(&index).copied().or_else(|| {
                planned
                    .iter()
                    .find(|(seq, ty, tags)| {
                        *seq > c.after && c.query.matches(ty, split_tags(*tags))
                    })
                    .map(|(seq, _, _)| *seq)
            });
            if let Some(seq) = conflict {
                results.push(Err(Error::AppendConditionFailed {
                    first_conflicting_sequence: seq,
                    after_sequence: c.after,
                }));
                continue;
            }
        }
        let mut parts = Vec::with_capacity(cmd.parts.len());
        for part in &cmd.parts {
            let (version, state) = streams[part.stream_id.as_str()];
            let first = next_seq;
            let n = part.events.len() as u64;
            if conditional {
                for (i, e) in part.events.iter().enumerate() {
                    planned.push((first + i as u64, &e.event_type, e.tags.as_deref()));
                }
            }
            if cmd.client_event_ids {
                for (i, e) in part.events.iter().enumerate() {
                    batch_ids.insert(
                        e.event_id,
                        Stored {
                            stream_id: part.stream_id.clone(),
                            version: version + 1 + i as u64,
                            seq: first + i as u64,
                        },
                    );
                }
            }
            next_seq += n;
            let new_version = version + n;
            streams.insert(part.stream_id.as_str(), (new_version, state));
            if !touched.contains(&part.stream_id.as_str()) {
                touched.push(part.stream_id.as_str());
            }
            parts.push(PartOutcome {
                version: new_version,
                first_sequence: first,
                last_sequence: next_seq - 1,
            });
        }
        let outcome = AppendOutcome {
            parts,
            duplicate: false,
        };
        if let Some(key) = cmd.idempotency_key.as_deref() {
            batch_keys.insert(
                key,
                Keyed {
                    streams: cmd.parts.iter().map(|p| p.stream_id.clone()).collect(),
                    outcome: outcome.clone(),
                },
            );
        }
        results.push(Ok(outcome));
    }
    let streams = touched.into_iter().map(|s| (s, streams[s].0)).collect();
    Plan {
        results,
        new_head: next_seq - 1,
        streams,
    }
}

/// Whether an append whose client event ids are (partly) stored already is a retry of a committed
/// append (then its original result), a conflict, or new (`None`). A retry has every event where
/// the append would have put it: each part's events in its stream at consecutive versions, and
/// all of them at consecutive sequences.
pub(super) fn retry_by_event_ids(
    cmd: &AppendCommand,
    stored: &HashMap<Uuid, Stored>,
    batch: &HashMap<Uuid, Stored>,
) -> Option<Result<AppendOutcome>> {
    let found: Vec<Option<&Stored>> = cmd
        .events()
        .map(|e| batch.get(&e.event_id).or_else(|| stored.get(&e.event_id)))
        .collect();
    let first_found = found.iter().position(Option::is_some)?;
    if let Some(Some(first)) = found.first()
        && found.iter().all(Option::is_some)
    {
        let mut at = 0;
        let mut parts = Vec::with_capacity(cmd.parts.len());
        for part in &cmd.parts {
            let mine = &found[at..at + part.events.len()];
            let (Some(Some(p0)), Some(Some(pn))) = (mine.first(), mine.last()) else {
                break;
            };
            let in_place = mine.iter().enumerate().all(|(i, s)| {
                let s = s.expect("all found");
                s.stream_id == part.stream_id
                    && s.version == p0.version + i as u64
                    && s.seq == first.seq + (at + i) as u64
            });
            if !in_place {
                break;
            }
            parts.push(PartOutcome {
                version: pn.version,
                first_sequence: p0.seq,
                last_sequence: pn.seq,
            });
            at += part.events.len();
        }
        if parts.len() == cmd.parts.len() {
            return Some(Ok(AppendOutcome {
                parts,
                duplicate: true,
            }));
        }
    }
    let s = found[first_found].expect("position found it");
    let event_id = cmd
        .events()
        .nth(first_found)
        .expect("found among the events")
        .event_id;
    Some(Err(Error::EventIdConflict {
        event_id,
        stream_id: s.stream_id.clone(),
        version: s.version,
    }))
}

/// What `pgstore.append_batch` is to prove, in a one-round-trip commit: the head and the stream
/// versions the batch was planned from.
pub(super) struct Check {
    pub(super) head: i64,
    pub(super) stream_ids: Vec<String>,
    pub(super) versions: Vec<i64>,
}

impl Check {
    pub(super) fn of(snapshot: Snapshot) -> Check {
        let (stream_ids, versions) = snapshot
            .streams
            .into_iter()
            .map(|(s, (v, _))| (s, v as i64))
            .unzip();
        Check {
            head: snapshot.head as i64,
            stream_ids,
            versions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ExpectedVersion, NewEvent, StreamAppend};

    const IDS: AssignedIds = AssignedIds::new(0x1234_5678_9abc);

    fn events(n: usize) -> Vec<NewEvent> {
        (0..n)
            .map(|_| NewEvent {
                event_id: Uuid::new_v4(),
                event_type: "t".into(),
                content_type: "application/json".into(),
                payload: Payload::Json("{}".into()),
                metadata: None,
                timestamp: None,
                tags: None,
            })
            .collect()
    }

    fn cmd(stream: &str, expected: ExpectedVersion, n: usize) -> AppendCommand {
        AppendCommand::one(stream.into(), expected, events(n))
    }

    /// An append to several streams: (stream, expected, events).
    fn multi(parts: &[(&str, ExpectedVersion, usize)]) -> AppendCommand {
        AppendCommand {
            parts: parts
                .iter()
                .map(|(s, e, n)| StreamAppend {
                    stream_id: (*s).into(),
                    expected: *e,
                    events: events(*n),
                })
                .collect(),
            ..cmd("unused", ExpectedVersion::Any, 1)
        }
    }

    /// The outcome of a one-stream append.
    fn one(version: u64, first: u64, last: u64, duplicate: bool) -> AppendOutcome {
        AppendOutcome {
            parts: vec![PartOutcome {
                version,
                first_sequence: first,
                last_sequence: last,
            }],
            duplicate,
        }
    }

    #[test]
    fn a_condition_counts_stored_conflicts_and_earlier_appends_of_the_batch() {
        use crate::store::{
            AppendCondition,
            query::{Query, QueryItem},
        };
        let tagged = |stream: &str, tags: &str, after: u64| {
            let mut c = cmd(stream, ExpectedVersion::Any, 1);
            c.parts[0].events[0].tags = Some(tags.into());
            c.condition = Some(AppendCondition {
                query: Query {
                    items: vec![QueryItem {
                        types: vec![],
                        tags: vec!["seat:1".into()],
                    }],
                },
                after,
            });
            c
        };
        let other = tagged("b", "seat:2", 10);
        let first = tagged("a", "x\u{1f}seat:1", 10);
        let second = tagged("c", "seat:1", 10);
        // An append after the first event of the batch does not conflict with it.
        let later = tagged("d", "seat:1", 12);
        let p = plan(&[&other, &first, &second, &later], &empty(10, &[]), IDS);
        assert!(p.results[0].is_ok() && p.results[1].is_ok());
        assert!(matches!(
            p.results[2],
            Err(Error::AppendConditionFailed {
                first_conflicting_sequence: 12,
                after_sequence: 10
            })
        ));
        assert_eq!(p.results[3].as_ref().unwrap().first_sequence(), 13);
        // A conflict found in the database wins (it precedes the batch).
        let mut snap = empty(10, &[]);
        snap.conflicts.insert(0, 7);
        let p = plan(&[&first], &snap, IDS);
        assert!(matches!(
            p.results[0],
            Err(Error::AppendConditionFailed {
                first_conflicting_sequence: 7,
                ..
            })
        ));
    }

    #[test]
    fn a_conflicting_append_fails_alone_and_batch_mates_see_each_other() {
        let snap = Snapshot {
            head: 10,
            streams: HashMap::from([("a".to_string(), (2, StreamState::Active))]),
            event_ids: HashMap::new(),
            keys: HashMap::new(),
            conflicts: HashMap::new(),
            checked: Vec::new(),
        };
        let c1 = cmd("a", ExpectedVersion::Exact(2), 2);
        let c2 = cmd("a", ExpectedVersion::Exact(2), 1); // stale after c1
        let c3 = cmd("a", ExpectedVersion::Exact(4), 1);
        let c4 = cmd("b", ExpectedVersion::NoStream, 1);
        let cmds = [&c1, &c2, &c3, &c4];
        let Plan {
            results,
            new_head,
            streams,
        } = plan(&cmds, &snap, IDS);
        let (rows, _) = lay_out(&cmds, &results, IDS);
        assert_eq!(new_head, 14);
        assert_eq!(streams, vec![("a", 5), ("b", 1)]);
        assert_eq!(rows.upsert_stream, vec!["a", "b"]);
        assert_eq!(rows.upsert_version, vec![5, 1]);
        assert_eq!(rows.seq, vec![11, 12, 13, 14]);
        assert_eq!(rows.version, vec![3, 4, 5, 1]);
        assert_eq!(results[0].as_ref().unwrap(), &one(4, 11, 12, false));
        assert!(matches!(
            results[1],
            Err(Error::WrongExpectedVersion { actual: 4, .. })
        ));
        assert_eq!(results[2].as_ref().unwrap().version(), 5);
        assert_eq!(results[3].as_ref().unwrap(), &one(1, 14, 14, false));
    }

    #[test]
    fn an_append_to_several_streams_is_all_or_nothing_and_its_batch_mates_see_it_whole() {
        let snap = empty(
            10,
            &[("a", 2, StreamState::Active), ("b", 1, StreamState::Active)],
        );
        let exact = ExpectedVersion::Exact;
        // b is at 1, not 0: the whole append fails, a is untouched.
        let bad = multi(&[("a", exact(2), 1), ("b", exact(0), 1)]);
        // Sees a at 2: the failed append left nothing behind.
        let good = multi(&[("a", exact(2), 2), ("c", ExpectedVersion::NoStream, 1)]);
        // Sees a at 4 and c at 1: the append before it counted whole.
        let after = multi(&[("c", exact(1), 1), ("a", exact(4), 1)]);
        let cmds = [&bad, &good, &after];
        let p = plan(&cmds, &snap, IDS);
        assert!(matches!(
            &p.results[0],
            Err(Error::WrongExpectedVersion { stream_id, actual: 1, .. }) if stream_id == "b"
        ));
        let part = |version, first_sequence, last_sequence| PartOutcome {
            version,
            first_sequence,
            last_sequence,
        };
        assert_eq!(
            p.results[1].as_ref().unwrap().parts,
            vec![part(4, 11, 12), part(1, 13, 13)]
        );
        assert_eq!(
            p.results[2].as_ref().unwrap().parts,
            vec![part(2, 14, 14), part(5, 15, 15)]
        );
        assert_eq!(p.new_head, 15);
        assert!(!p.clean(), "a failed append goes the reading way");
        let (rows, _) = lay_out(&cmds, &p.results, IDS);
        assert_eq!(rows.seq, vec![11, 12, 13, 14, 15]);
        assert_eq!(rows.stream_id, vec!["a", "a", "c", "c", "a"]);
        assert_eq!(rows.version, vec![3, 4, 1, 2, 5]);
        assert_eq!(rows.upsert_stream, vec!["a", "c"]);
        assert_eq!(rows.upsert_version, vec![5, 2]);
    }

    #[test]
    fn a_key_records_every_stream_of_an_append_and_its_retry_gets_them_back() {
        let mut first = multi(&[
            ("a", ExpectedVersion::Any, 2),
            ("b", ExpectedVersion::Any, 1),
        ]);
        first.idempotency_key = Some("k".into());
        let p = plan(&[&first], &empty(10, &[]), IDS);
        let outcome = p.results[0].as_ref().unwrap().clone();
        let (_, keys) = lay_out(&[&first], &p.results, IDS);
        assert_eq!((keys.version[0], keys.first[0], keys.last[0]), (1, 11, 13));
        let back = Keyed::from_row(keys.stream_id[0].to_string(), 1, 11, 13);
        assert_eq!(back.streams, vec!["a", "b"]);
        assert_eq!(back.outcome.parts, outcome.parts);
        // A one-stream append's row is the stream id alone, as before.
        let single = keyed("a", "k1");
        let p1 = plan(&[&single], &empty(10, &[]), IDS);
        let (_, keys1) = lay_out(&[&single], &p1.results, IDS);
        assert_eq!(keys1.stream_id[0], "a");

        let mut snap = empty(13, &[]);
        snap.keys.insert("k".into(), back);
        let mut retry = first.clone();
        retry.parts[0].expected = ExpectedVersion::NoStream; // a retry is not checked again
        let other = keyed("a", "k");
        let p = plan(&[&retry, &other], &snap, IDS);
        assert_eq!(
            p.results[0].as_ref().unwrap(),
            &AppendOutcome {
                duplicate: true,
                ..outcome
            }
        );
        assert!(matches!(
            &p.results[1],
            Err(Error::IdempotencyKeyConflict { streams, .. }) if streams == &["a", "b"]
        ));
        assert_eq!(p.new_head, 13, "nothing written");

        // A row in a form this release cannot read names no stream a request can write: the
        // key is taken, never a retry.
        let unreadable = Keyed::from_row("a\u{1e}later-form".into(), 1, 11, 13);
        let mut snap = empty(13, &[]);
        snap.keys.insert("k".into(), unreadable);
        let p = plan(&[&first], &snap, IDS);
        assert!(matches!(
            p.results[0],
            Err(Error::IdempotencyKeyConflict { .. })
        ));
    }

    #[test]
    fn client_event_ids_retry_an_append_to_several_streams_only_where_it_put_them() {
        let mut original = multi(&[
            ("a", ExpectedVersion::Any, 2),
            ("b", ExpectedVersion::Any, 1),
        ]);
        original.client_event_ids = true;
        let mut snap = empty(20, &[]);
        let at = [("a", 5, 11), ("a", 6, 12), ("b", 1, 13)];
        for (e, (stream, version, seq)) in original.events().zip(at) {
            snap.event_ids.insert(
                e.event_id,
                Stored {
                    stream_id: stream.into(),
                    version,
                    seq,
                },
            );
        }
        let mut swapped = original.clone();
        swapped.parts.reverse();
        let p = plan(&[&original, &swapped], &snap, IDS);
        let o = p.results[0].as_ref().unwrap();
        assert!(o.duplicate);
        assert_eq!((o.parts[0].version, o.parts[1].version), (6, 1));
        assert_eq!((o.first_sequence(), o.last_sequence()), (11, 13));
        assert!(matches!(p.results[1], Err(Error::EventIdConflict { .. })));
    }

    #[test]
    fn the_condition_of_an_append_to_several_streams_ignores_its_own_events() {
        use crate::store::{
            AppendCondition,
            query::{Query, QueryItem},
        };
        let mut c = multi(&[
            ("a", ExpectedVersion::Any, 1),
            ("b", ExpectedVersion::Any, 1),
        ]);
        for p in &mut c.parts {
            p.events[0].tags = Some("seat:1".into());
        }
        c.condition = Some(AppendCondition {
            query: Query {
                items: vec![QueryItem {
                    types: vec![],
                    tags: vec!["seat:1".into()],
                }],
            },
            after: 10,
        });
        let again = c.clone();
        let p = plan(&[&c, &again], &empty(10, &[]), IDS);
        assert!(p.results[0].is_ok());
        assert!(matches!(
            p.results[1],
            Err(Error::AppendConditionFailed {
                first_conflicting_sequence: 11,
                ..
            })
        ));
    }

    fn empty(head: u64, streams: &[(&str, u64, StreamState)]) -> Snapshot {
        Snapshot {
            head,
            streams: streams
                .iter()
                .map(|(s, v, st)| (s.to_string(), (*v, *st)))
                .collect(),
            event_ids: HashMap::new(),
            keys: HashMap::new(),
            conflicts: HashMap::new(),
            checked: Vec::new(),
        }
    }

    fn keyed(stream: &str, key: &str) -> AppendCommand {
        AppendCommand {
            idempotency_key: Some(key.into()),
            ..cmd(stream, ExpectedVersion::Any, 1)
        }
    }

    #[test]
    fn a_key_seen_before_or_earlier_in_the_batch_is_a_retry_and_writes_nothing() {
        let mut snap = empty(5, &[("a", 1, StreamState::Active)]);
        let stored = one(1, 3, 3, true);
        snap.keys.insert(
            "k-old".into(),
            Keyed {
                streams: vec!["a".into()],
                outcome: stored.clone(),
            },
        );
        let (old, new1, new2, other) = (
            keyed("a", "k-old"),
            keyed("a", "k-new"),
            keyed("a", "k-new"),
            keyed("b", "k-new"),
        );
        let cmds = [&old, &new1, &new2, &other];
        let p = plan(&cmds, &snap, IDS);
        assert_eq!(p.results[0].as_ref().unwrap(), &stored);
        let first = p.results[1].as_ref().unwrap();
        assert!(!first.duplicate && first.first_sequence() == 6);
        let again = p.results[2].as_ref().unwrap();
        assert!(
            again.duplicate && again.first_sequence() == 6,
            "same answer"
        );
        assert!(matches!(
            p.results[3],
            Err(Error::IdempotencyKeyConflict { .. })
        ));
        assert_eq!(p.new_head, 6, "one event written in all");
        assert!(!p.clean(), "retries go the reading way");
        let (rows, keys) = lay_out(&cmds, &p.results, IDS);
        assert_eq!(rows.seq, vec![6]);
        assert_eq!(keys.key, vec!["k-new"]);
    }

    #[test]
    fn client_event_ids_make_a_retry_only_when_they_match_a_whole_append() {
        let mut original = cmd("a", ExpectedVersion::Any, 2);
        original.client_event_ids = true;
        let mut snap = empty(10, &[("a", 2, StreamState::Active)]);
        for (i, e) in original.events().enumerate() {
            snap.event_ids.insert(
                e.event_id,
                Stored {
                    stream_id: "a".into(),
                    version: 1 + i as u64,
                    seq: 7 + i as u64,
                },
            );
        }
        let mut partial = cmd("a", ExpectedVersion::Any, 2);
        partial.client_event_ids = true;
        partial.parts[0].events[0].event_id = original.parts[0].events[1].event_id;
        let mut elsewhere = original.clone();
        elsewhere.parts[0].stream_id = "b".into();
        let cmds = [&original, &partial, &elsewhere];
        let p = plan(&cmds, &snap, IDS);
        assert_eq!(p.results[0].as_ref().unwrap(), &one(2, 7, 8, true));
        assert!(matches!(
            p.results[1],
            Err(Error::EventIdConflict { version: 2, .. })
        ));
        assert!(matches!(p.results[2], Err(Error::EventIdConflict { .. })));
        assert_eq!(p.new_head, 10, "nothing written");
    }

    #[test]
    fn an_id_of_the_stores_own_form_that_no_event_has_is_refused() {
        let mut c = cmd("a", ExpectedVersion::Any, 1);
        c.client_event_ids = true;
        c.parts[0].events[0].event_id = IDS.id(99);
        let p = plan(&[&c], &empty(10, &[]), IDS);
        assert!(matches!(p.results[0], Err(Error::InvalidArgument { .. })));
    }

    #[test]
    fn archived_and_tombstoned_streams_refuse_appends_and_expectations_are_checked() {
        let snap = empty(
            3,
            &[
                ("arch", 1, StreamState::Archived),
                ("dead", 2, StreamState::Tombstoned),
                ("live", 3, StreamState::Active),
            ],
        );
        let cases = [
            cmd("arch", ExpectedVersion::Any, 1),
            cmd("dead", ExpectedVersion::Any, 1),
            cmd("live", ExpectedVersion::NoStream, 1),
            cmd("new", ExpectedVersion::StreamExists, 1),
            cmd("live", ExpectedVersion::StreamExists, 1),
            cmd("new", ExpectedVersion::NoStream, 1),
        ];
        let cmds: Vec<&AppendCommand> = cases.iter().collect();
        let p = plan(&cmds, &snap, IDS);
        assert!(matches!(
            p.results[0],
            Err(Error::StreamState {
                state: StreamState::Archived,
                ..
            })
        ));
        assert!(matches!(
            p.results[1],
            Err(Error::StreamState {
                state: StreamState::Tombstoned,
                ..
            })
        ));
        assert!(matches!(
            p.results[2],
            Err(Error::WrongExpectedVersion { actual: 3, .. })
        ));
        assert!(matches!(
            p.results[3],
            Err(Error::WrongExpectedVersion { actual: 0, .. })
        ));
        assert_eq!(p.results[4].as_ref().unwrap(), &one(4, 4, 4, false));
        assert_eq!(p.results[5].as_ref().unwrap(), &one(1, 5, 5, false));
        assert_eq!(p.streams, vec![("live", 4), ("new", 1)]);
    }

    #[test]
    fn the_memory_plans_only_what_it_remembers_and_rests_after_a_stale_check() {
        let mut m = Memory::default();
        let a = cmd("a", ExpectedVersion::Any, 1);
        let b = cmd("b", ExpectedVersion::Any, 1);
        assert!(m.snapshot(&[&a]).is_none(), "nothing known yet");
        m.remember(7, [("a".to_string(), (2, StreamState::Active))]);
        let snap = m.snapshot(&[&a]).expect("a is remembered");
        assert_eq!((snap.head, snap.streams["a"].0), (7, 2));
        assert!(m.snapshot(&[&a, &b]).is_none(), "b is not");
        m.set("b", (1, StreamState::Active));
        assert!(m.snapshot(&[&a, &b]).is_some());
        m.rest_until = Some(std::time::Instant::now() + std::time::Duration::from_secs(60));
        assert!(m.snapshot(&[&a]).is_none(), "resting");
        m.rest_until = None;
        m.forget();
        assert!(m.snapshot(&[&a]).is_none(), "forgotten");
    }
}
