//! The NATS JetStream backend of the storage trait, for several wasmq nodes on one JetStream
//! cluster: one stream per (topic, queue), so the stream sequence is the dense queue offset
//! (sequence = offset + 1) and concurrent appenders on any node get distinct offsets; records in
//! one KV bucket (its revision is the compare-and-set revision); a message's id in its subject
//! and business keys in an index stream per queue (`index.rs`); blobs in an object store.
//! Appends carry the message id as `Nats-Msg-Id`, so a retried append inside JetStream's
//! duplicate window is stored once.
//! Acknowledged means acknowledged by JetStream on its replicas (nats-server 2.9 fsyncs every
//! 2 minutes, so this is the relaxed kind of durability there).

mod index;
mod reads;
mod writes;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::stream::{self, Stream};
use async_nats::jetstream::{self, kv, object_store};
use async_trait::async_trait;
use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use super::{
    Appended, Commit, Committed, Expect, MessageId, NewMessage, QueueExtent, QueueLimits, Record,
    RecordWrite, Storage, StorageError, StoredMessage, Watchers,
};

const RECORDS: &str = "WQ_RECORDS";
const IDS: &str = "WQ_IDS";
const BLOBS: &str = "WQ_BLOBS";
const KEYS: &str = "WQ_KEYS";
/// Records of guarded appends in progress (see [`JetStreamStorage::append_guarded`]).
const INTENTS: &str = "__intent";
/// The record space of kv-space locks (see [`JetStreamStorage::lock_space`]).
const LOCKS: &str = "__lock";
/// How long a kv-space lock holds unless given back: far longer than a commit takes (a few
/// JetStream requests), so only a dead holder's lapses.
const LOCK_TTL_MS: u64 = 15_000;
/// How often (200 ms apart) a commit past its commit point tries to finish before it leaves
/// the rest to recovery.
const FINISH_TRIES: u32 = 150;
/// How long a commit waits for a kv-space lock before it is refused for now.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// How old a guarded append's intent must be before another node finishes it: a live writer
/// takes far less (each of its steps is one JetStream request, which times out in seconds).
pub const INTENT_AGE: std::time::Duration = std::time::Duration::from_secs(15);
/// How long one listing or lookup may take before it is an error, not a hang.
const SCAN_TIMEOUT: Duration = Duration::from_secs(30);
/// Direct gets in flight per read.
const READ_AHEAD: usize = 64;
/// The smallest read that uses a reader or, full and the second in a row, leaves one where it
/// ended (see `reads.rs`): the runners' reads of a backlog, not lookups.
const READER_MIN_LIMIT: usize = 64;
/// How long a reader's consumer lives on the server without a pull.
const READER_IDLE: Duration = Duration::from_secs(10);
/// How long a pull from a reader may take before the read falls back to direct gets (its
/// consumer's server gone, say): a pull of what is there answers at once.
const READER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a queue gets no new reader after one could not be made or a pull failed.
const READER_BACKOFF: Duration = Duration::from_secs(30);
/// Readers kept per queue: runners of several subscriptions (or broadcast instances) going
/// through one queue's backlog each have one.
const READERS_PER_QUEUE: usize = 8;
/// How long a lost append notification (`wqn.{topic}`) can delay an idle reader.
const RECHECK_IDLE: Duration = Duration::from_secs(1);

fn js_err(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::JetStream(format!("{what}: {e}"))
}

/// Whether a get from the stream leader failed because no such message is stored (some
/// servers answer that as a JetStream error code).
fn no_message(e: &stream::LastRawMessageError) -> bool {
    match e.kind() {
        stream::LastRawMessageErrorKind::NoMessageFound => true,
        stream::LastRawMessageErrorKind::JetStream(j) => {
            j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
        }
        _ => false,
    }
}

/// Whether a record stream message is a KV deletion marker (`KV-Operation` DEL or PURGE; a
/// put carries none or PUT).
fn is_deletion_marker(m: &jetstream::message::StreamMessage) -> bool {
    m.headers
        .get("KV-Operation")
        .is_some_and(|op| op.as_str() != "PUT")
}

/// A queue message as a stream stores it: `payload` its msgpack [`NewMessage`], `sequence`
/// its stream sequence (its offset + 1), `stored_at` its store time in ms since the epoch.
/// Errors: [`StorageError::Corrupt`] for a payload that does not decode.
fn stored_message(
    topic: &str,
    queue: u32,
    sequence: u64,
    stored_at: u64,
    payload: &[u8],
) -> Result<StoredMessage, StorageError> {
    let offset = sequence.saturating_sub(1);
    let message = rmp_serde::from_slice(payload)
        .map_err(|e| StorageError::Corrupt(format!("message {topic}/{queue}/{offset}: {e}")))?;
    Ok(StoredMessage {
        topic: topic.to_string(),
        offset,
        stored_at,
        message,
    })
}

/// A JetStream store time (the stream leader's clock) in ms since the epoch.
fn epoch_ms(time: &async_nats::datetime::DateTime) -> u64 {
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// A stream's id deduplication window for messages kept `max_age_ms` (`None`: no age limit):
/// JetStream's 2 min, no longer than they are kept (JetStream refuses a longer one).
fn duplicate_window(max_age_ms: Option<u64>) -> Duration {
    match max_age_ms {
        Some(age) => DUPLICATE_WINDOW.min(Duration::from_millis(age)),
        None => DUPLICATE_WINDOW,
    }
}

/// A name as one NATS token that is also a valid stream name and KV key: ASCII letters, digits
/// and `-` stay, every other byte becomes `=XX`; the empty string is `=`.
fn enc(s: &str) -> String {
    if s.is_empty() {
        return "=".into();
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

fn dec(s: &str) -> Result<String, StorageError> {
    if s == "=" {
        return Ok(String::new());
    }
    let (mut bytes, raw) = (Vec::with_capacity(s.len()), s.as_bytes());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'=' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| StorageError::Corrupt(format!("bad name encoding {s:?}")))?;
            bytes.push(hex);
            i += 3;
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8(bytes).map_err(|_| StorageError::Corrupt(format!("bad name {s:?}")))
}

/// A queue's low water from its stream's state: sequences are offsets + 1, and a stream whose
/// messages were all purged has its first sequence one past its last.
fn low_water_of(state: &stream::State) -> u64 {
    state
        .first_sequence
        .saturating_sub(1)
        .min(state.last_sequence)
}

/// How long a queue stream remembers message ids to drop a re-sent append (JetStream's default).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

fn stream_name(topic: &str, queue: u32) -> String {
    format!("WQM_{}_{queue}", enc(topic))
}

/// The subject of a queue's messages appended before ids went into subjects (still bound, so
/// nodes not yet upgraded append there during a rolling upgrade).
fn subject(topic: &str, queue: u32) -> String {
    format!("wqm.{}.{queue}", enc(topic))
}

/// The subject a message is appended on: its queue's, then its id, so a lookup by id is a
/// direct get of the last message on that subject, with no index entry per message.
fn id_subject(topic: &str, queue: u32, id: &MessageId) -> String {
    format!("wqm.{}.{queue}.{id}", enc(topic))
}

/// The subjects of a queue stream that [`id_subject`] needs bound (a stream made before
/// this layout has only [`subject`]'s).
fn id_subjects(topic: &str, queue: u32) -> String {
    format!("wqm.{}.{queue}.*", enc(topic))
}

fn record_key(space: &str, key: &str) -> String {
    format!("{}.{}", enc(space), enc(key))
}

/// Where a message is, as the id index stores it.
#[derive(Serialize, Deserialize)]
struct Location {
    topic: String,
    queue: u32,
    offset: u64,
}

/// A guarded append in progress: if the guard's record ends up holding `value`, the messages
/// must be in their queues too (a node that died in between left this behind).
#[derive(Serialize, Deserialize)]
struct Intent {
    topic: String,
    messages: Vec<NewMessage>,
    space: String,
    key: String,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    /// A [`Commit`]'s guard deletes its record (a timer) instead of writing `value`.
    #[serde(default)]
    guard_deletes: bool,
    /// A [`Commit`]'s appends to topics other than `topic`, finished after the guard.
    #[serde(default)]
    appends: Vec<(String, Vec<NewMessage>)>,
    /// A [`Commit`]'s record writes after the guard.
    #[serde(default)]
    records: Vec<IntentRecord>,
    /// The node name of its writer (`[server] node_id`), if it has a fixed one.
    #[serde(default)]
    writer: String,
}

/// A record write an intent finishes after its guard.
#[derive(Serialize, Deserialize)]
struct IntentRecord {
    space: String,
    key: String,
    value: Option<serde_bytes::ByteBuf>,
    /// The revision the writer checked (a kv key it read); a recovery writes only over it, so
    /// it never overwrites what a later writer wrote. `None`: written whatever is there.
    revision: Option<u64>,
}

pub struct JetStreamStorage {
    client: async_nats::Client,
    js: Context,
    replicas: usize,
    records_stream: Stream,
    ids: kv::Store,
    keys: Stream,
    blobs: object_store::ObjectStore,
    streams: tokio::sync::Mutex<HashMap<(String, u32), Stream>>,
    watchers: Arc<Watchers>,
    closed: AtomicBool,
    notifier: tokio::task::JoinHandle<()>,
    /// Serialises this node's commits: their conditions are checked and their records written
    /// under it, so two deliveries on one node never both pass a check of the same revision.
    commit_lock: tokio::sync::Mutex<()>,
    /// This node's fixed name (`[server] node_id`; empty: none). Its intents carry it, and at
    /// connect it finishes its own at once, whatever their age: no other node runs under its
    /// name, so none of them belongs to a live writer.
    writer: String,
    /// This run's token (a fresh id per connect), told apart from earlier runs of `writer`.
    run: String,
    /// The index age last given to the index streams (see [`Storage::limit_index_age`]).
    index_age: std::sync::Mutex<Option<Option<u64>>>,
    /// Each queue's index stream (see `index.rs`).
    index_streams: tokio::sync::Mutex<HashMap<(String, u32), Stream>>,
    index_checkpoints: index::Checkpoints,
    /// Where reads of each queue left a consumer (see `reads.rs`).
    readers: reads::Readers,
    /// Reads answered by a reader (see [`Self::reads_pulled`]).
    pulled: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for JetStreamStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStorage")
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

/// A KV bucket (one value per key), created through its stream: async-nats's
/// `create_key_value` first asks for the account's limits, and cannot parse nats-server 2.9's
/// answer.
async fn kv_bucket(
    js: &Context,
    bucket: &str,
    replicas: usize,
    max_value: i32,
) -> Result<kv::Store, StorageError> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_message_size: max_value,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| js_err(&format!("bucket {bucket}"), e))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| js_err(&format!("bucket {bucket}"), e))
}

impl JetStreamStorage {
    /// Connects to the cluster at `urls` and creates what is missing (buckets, the key index),
    /// with `replicas` copies of everything; then finishes guarded appends a dead node left.
    pub async fn connect(urls: &[String], replicas: usize) -> Result<Self, StorageError> {
        Self::connect_as(urls, replicas, "").await
    }

    /// [`Self::connect`] for the node named `writer` (`[server] node_id`; empty: none): its
    /// intents carry the name, and the ones a former run of it left are finished now.
    pub async fn connect_as(
        urls: &[String],
        replicas: usize,
        writer: &str,
    ) -> Result<Self, StorageError> {
        let addrs = urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| js_err(&format!("bad NATS url in {}", urls.join(", ")), e))?;
        let client = async_nats::ConnectOptions::new()
            .name("wasmq")
            .connect(addrs)
            .await
            .map_err(|e| js_err(&format!("cannot connect to {}", urls.join(", ")), e))?;
        let js = jetstream::new(client.clone());
        let replicas = replicas.max(1);
        // Records are read and written through their stream (see `latest_record`).
        kv_bucket(&js, RECORDS, replicas, 64 << 20).await?;
        let records_stream = js
            .get_stream(format!("KV_{RECORDS}"))
            .await
            .map_err(|e| js_err("records stream", e))?;
        let ids = kv_bucket(&js, IDS, replicas, 1 << 10).await?;
        let keys = js
            .get_or_create_stream(stream::Config {
                name: KEYS.into(),
                subjects: vec!["wqk.>".into()],
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("key index", e))?;
        let blobs = js
            .create_object_store(object_store::Config {
                bucket: BLOBS.into(),
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("blob store", e))?;
        // Appends on any node wake this node's watchers through a core NATS notification.
        let watchers: Arc<Watchers> = Arc::default();
        let mut notes = client
            .subscribe("wqn.>")
            .await
            .map_err(|e| js_err("notifications", e))?;
        let w = watchers.clone();
        let notifier = tokio::spawn(async move {
            while let Some(note) = notes.next().await {
                if let Some(topic) = note.subject.strip_prefix("wqn.")
                    && let Ok(topic) = dec(topic)
                {
                    w.bump(&topic);
                }
            }
        });
        let storage = Self {
            client,
            js,
            replicas,
            records_stream,
            ids,
            keys,
            blobs,
            streams: Default::default(),
            watchers,
            closed: AtomicBool::new(false),
            notifier,
            commit_lock: tokio::sync::Mutex::new(()),
            writer: writer.to_string(),
            run: uuid::Uuid::now_v7().to_string(),
            index_age: std::sync::Mutex::new(None),
            index_streams: Default::default(),
            index_checkpoints: Default::default(),
            readers: Default::default(),
            pulled: Default::default(),
        };
        storage.finish_intents(INTENT_AGE, true).await?;
        Ok(storage)
    }

    /// How many queue reads a reader (a pull consumer left where a runner's reads of a
    /// backlog went) answered with one pull, not direct gets, since connect.
    pub fn reads_pulled(&self) -> u64 {
        self.pulled.load(Ordering::Relaxed)
    }

    fn check_open(&self) -> Result<(), StorageError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    /// The configuration of a queue's stream: its subject, replicas and retention limits
    /// (JetStream deletes by age and size itself; 0 is "no limit" to it).
    fn queue_config(&self, topic: &str, queue: u32, limits: QueueLimits) -> stream::Config {
        stream::Config {
            name: stream_name(topic, queue),
            subjects: vec![subject(topic, queue), id_subjects(topic, queue)],
            num_replicas: self.replicas,
            allow_direct: true,
            max_age: Duration::from_millis(limits.max_age_ms.unwrap_or(0)),
            max_bytes: limits
                .max_bytes
                .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            discard: stream::DiscardPolicy::Old,
            // JetStream's 2 min id deduplication, no longer than messages are kept.
            duplicate_window: duplicate_window(limits.max_age_ms),
            ..Default::default()
        }
    }

    /// The stream of a queue; created when `create` (appends), else `None` if it never existed.
    async fn queue_stream(
        &self,
        topic: &str,
        queue: u32,
        create: bool,
    ) -> Result<Option<Stream>, StorageError> {
        let config = create.then(|| self.queue_config(topic, queue, QueueLimits::default()));
        self.cached_stream(
            &self.streams,
            (topic, queue),
            stream_name(topic, queue),
            config,
        )
        .await
    }

    /// Makes sure a queue's stream exists and binds [`id_subjects`], for an append: a stream
    /// made before ids went into subjects (or narrowed again by a node not yet upgraded,
    /// whose limit change writes back the subjects it read) gets that one subject added to
    /// the subjects the server has now; whatever else is configured stays.
    async fn append_stream(&self, topic: &str, queue: u32) -> Result<(), StorageError> {
        let wide = id_subjects(topic, queue);
        let name = stream_name(topic, queue);
        if let Some(s) = self.queue_stream(topic, queue, true).await?
            && s.cached_info().config.subjects.contains(&wide)
        {
            return Ok(());
        }
        let mut streams = self.streams.lock().await;
        let err = |e: &dyn std::fmt::Display| js_err(&format!("stream {name}"), e);
        // Fetched with its info just now: the subjects are the server's.
        let mut fresh = self.js.get_stream(&name).await.map_err(|e| err(&e))?;
        let mut config = fresh.cached_info().config.clone();
        if !config.subjects.contains(&wide) {
            config.subjects.push(wide);
            self.js.update_stream(&config).await.map_err(|e| err(&e))?;
            fresh = self.js.get_stream(&name).await.map_err(|e| err(&e))?;
        }
        streams.insert((topic.to_string(), queue), fresh);
        Ok(())
    }

    /// A stream from `cache` (keyed by topic and queue), else looked up by `name`: created
    /// with `create` if given, else `None` when it does not exist.
    async fn cached_stream(
        &self,
        cache: &tokio::sync::Mutex<HashMap<(String, u32), Stream>>,
        (topic, queue): (&str, u32),
        name: String,
        create: Option<stream::Config>,
    ) -> Result<Option<Stream>, StorageError> {
        let mut streams = cache.lock().await;
        if let Some(s) = streams.get(&(topic.to_string(), queue)) {
            return Ok(Some(s.clone()));
        }
        let found = if let Some(config) = create {
            self.js
                .get_or_create_stream(config)
                .await
                .map(Some)
                .map_err(|e| js_err(&format!("stream {name}"), e))?
        } else {
            match self.js.get_stream(&name).await {
                Ok(s) => Some(s),
                Err(e)
                    if matches!(
                        e.kind(),
                        jetstream::context::GetStreamErrorKind::JetStream(ref j)
                            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                    ) =>
                {
                    None
                }
                Err(e) => return Err(js_err(&format!("stream {name}"), e)),
            }
        };
        if let Some(s) = &found {
            streams.insert((topic.to_string(), queue), s.clone());
        }
        Ok(found)
    }

    /// Gives a stream the limits of `wanted` (`max_age`, `max_bytes`, `duplicate_window`):
    /// creates it with `wanted` when `existing` is `None`, else changes only those (whatever
    /// else an operator tuned on it stays). A changed stream's handle leaves `cache` (keyed by
    /// topic and queue), which would carry the old configuration.
    async fn apply_limits(
        &self,
        cache: &tokio::sync::Mutex<HashMap<(String, u32), Stream>>,
        (topic, queue): (&str, u32),
        existing: Option<Stream>,
        wanted: stream::Config,
    ) -> Result<(), StorageError> {
        let name = wanted.name.clone();
        let Some(mut stream) = existing else {
            self.js
                .get_or_create_stream(wanted)
                .await
                .map_err(|e| js_err(&format!("stream {name}"), e))?;
            return Ok(());
        };
        let mut config = stream
            .info()
            .await
            .map_err(|e| js_err(&format!("stream {name}"), e))?
            .config
            .clone();
        let limits = |c: &stream::Config| (c.max_age, c.max_bytes, c.duplicate_window);
        if limits(&config) == limits(&wanted) {
            return Ok(());
        }
        config.max_age = wanted.max_age;
        config.max_bytes = wanted.max_bytes;
        config.duplicate_window = wanted.duplicate_window;
        self.js
            .update_stream(&config)
            .await
            .map_err(|e| js_err(&format!("stream {name}"), e))?;
        cache.lock().await.remove(&(topic.to_string(), queue));
        Ok(())
    }

    /// Publishes to JetStream and waits for its acknowledgement: the stream sequence.
    fn publish_future(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Vec<u8>,
    ) -> futures::future::BoxFuture<'static, Result<u64, String>> {
        let js = self.js.clone();
        async move {
            js.publish_with_headers(subject, headers, payload.into())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map(|a| a.sequence)
                .map_err(|e| e.to_string())
        }
        .boxed()
    }
}

impl Drop for JetStreamStorage {
    fn drop(&mut self) {
        self.notifier.abort();
    }
}

impl JetStreamStorage {
    /// The newest entry of record key `k` (see [`record_key`]) as the records stream's leader
    /// has it: its revision and value, `None` for a deletion marker; `None` when never written
    /// (or purged). Not a direct get, which any replica may answer before it applied the
    /// newest writes: every check, compare-and-set and cursor read here needs those.
    pub(super) async fn latest_record(
        &self,
        k: &str,
    ) -> Result<Option<(u64, Option<Vec<u8>>)>, StorageError> {
        let subject = format!("$KV.{RECORDS}.{k}");
        match self
            .records_stream
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => {
                let value = (!is_deletion_marker(&m)).then(|| m.payload.to_vec());
                Ok(Some((m.sequence, value)))
            }
            Err(e) if no_message(&e) => Ok(None),
            Err(e) => Err(js_err("record", e)),
        }
    }

    /// The body of [`Storage::commit`], once the locks it needs are held.
    async fn commit_held(
        &self,
        checks: Vec<crate::storage::RecordCheck>,
        records: Vec<RecordWrite>,
        appends: Vec<(String, Vec<NewMessage>)>,
        conditional: bool,
        die_at_commit_point: bool,
    ) -> Result<Committed, StorageError> {
        if conditional && let Some(g) = records.first() {
            // The commit point's first: a delivery already completed is told so, whatever
            // else changed since.
            self.check_condition(&g.space, &g.key, g.expect).await?;
        }
        let conditions = checks
            .iter()
            .map(|c| (c.space.as_str(), c.key.as_str(), c.expect))
            .chain(
                records
                    .iter()
                    .skip(1)
                    .map(|r| (r.space.as_str(), r.key.as_str(), r.expect)),
            )
            .map(|(space, key, expect)| self.check_condition(space, key, expect));
        let checked = futures::future::join_all(conditions)
            .await
            .into_iter()
            .collect::<Result<Vec<u64>, StorageError>>()?;
        let mut checked = checked;
        let mut records = records.into_iter();
        let Some(guard) = records.next() else {
            // Nothing to guard: appends only, each topic's atomically on its own.
            let mut out = Committed::default();
            for (topic, messages) in &appends {
                out.appended
                    .extend(self.append_inner(topic, messages).await?);
            }
            return Ok(out);
        };
        let rest: Vec<RecordWrite> = records.collect();
        let rest_revisions = checked.split_off(checks.len());
        let intent_records = rest
            .iter()
            .zip(&rest_revisions)
            .map(|(w, rev)| IntentRecord {
                space: w.space.clone(),
                key: w.key.clone(),
                value: w.value.clone().map(serde_bytes::ByteBuf::from),
                revision: match w.expect {
                    Expect::Any | Expect::Present => None,
                    Expect::Absent | Expect::Revision(_) => Some(*rev),
                },
            })
            .collect();
        let intent_id = uuid::Uuid::now_v7().to_string();
        let intent = rmp_serde::to_vec(&Intent {
            topic: String::new(),
            messages: Vec::new(),
            space: guard.space.clone(),
            key: guard.key.clone(),
            value: guard.value.clone().unwrap_or_default(),
            guard_deletes: guard.value.is_none(),
            appends: appends.clone(),
            records: intent_records,
            writer: self.writer.clone(),
        })
        .map_err(|e| StorageError::Encode(e.to_string()))?;
        // A fresh id: no condition (and no read) needed.
        self.write_record(INTENTS, &intent_id, Some(intent), Expect::Any)
            .await?;
        let guard_revision = match self
            .write_record(&guard.space, &guard.key, guard.value.clone(), guard.expect)
            .await
        {
            Ok(r) => r,
            Err(e) => return Err(self.after_guard_error(&intent_id, e).await),
        };
        if die_at_commit_point {
            return Ok(Committed::default());
        }
        let mut out = Committed::default();
        out.revisions.push(if guard.value.is_some() {
            guard_revision
        } else {
            0
        });
        // Past the commit point the commit is decided: what is left is tried again (a retried
        // append is deduplicated by message id, the writes are the same) until it is done, the
        // storage closes, or FINISH_TRIES pass; then recovery finishes it from the intent.
        let mut tries = 0;
        loop {
            match self.finish_rest(&rest, &appends, &intent_id).await {
                Ok((revisions, appended)) => {
                    out.revisions.extend(revisions);
                    out.appended = appended;
                    return Ok(out);
                }
                Err(e) if tries < FINISH_TRIES && self.check_open().is_ok() => {
                    tries += 1;
                    tracing::warn!(error = %e, "finishing a commit past its commit point; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The writes and appends of a commit after its commit point, then its intent's removal:
    /// the new revisions (0 for a delete) and where the messages went.
    async fn finish_rest(
        &self,
        rest: &[RecordWrite],
        appends: &[(String, Vec<NewMessage>)],
        intent_id: &str,
    ) -> Result<(Vec<u64>, Vec<Appended>), StorageError> {
        // Side by side (their conditions were checked before the commit point), the writes of
        // a value before the deletions: a reader on another node may see part of a commit, but
        // never a record deleted before what the commit stores in its place (a dead letter's
        // pin before the pin of the timer that replaces it, see `crate::dispatch::pins`).
        let mut revisions = vec![0; rest.len()];
        for puts in [true, false] {
            let writes = rest
                .iter()
                .enumerate()
                .filter(|(_, w)| w.value.is_some() == puts)
                .map(|(i, w)| async move {
                    let r = self
                        .write_record(&w.space, &w.key, w.value.clone(), Expect::Any)
                        .await?;
                    Ok::<(usize, u64), StorageError>((i, if puts { r } else { 0 }))
                });
            for r in futures::future::join_all(writes).await {
                let (i, revision) = r?;
                revisions[i] = revision;
            }
        }
        let mut appended = Vec::new();
        for (topic, messages) in appends {
            appended.extend(self.append_inner(topic, messages).await?);
        }
        self.write_record(INTENTS, intent_id, None, Expect::Any)
            .await?;
        Ok((revisions, appended))
    }
}

#[async_trait]
impl Storage for JetStreamStorage {
    async fn append(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, StorageError> {
        self.check_open()?;
        self.append_inner(topic, &messages).await
    }

    /// JetStream has no transaction over a record and several streams: the messages go into an
    /// intent record first, then the guard is written (compare-and-set), then the messages are
    /// appended and the intent dropped. A node that dies in between leaves the intent, and the
    /// next node to connect finishes it: the messages appear exactly when the guard holds.
    async fn append_guarded(
        &self,
        topic: &str,
        messages: Vec<NewMessage>,
        guard: RecordWrite,
    ) -> Result<(Vec<Appended>, u64), StorageError> {
        self.check_open()?;
        let (intent_id, revision) = self
            .guard_with_intent(topic, &messages, guard, false)
            .await?;
        let appended = self.append_inner(topic, &messages).await?;
        self.write_record(INTENTS, &intent_id, None, Expect::Any)
            .await?;
        Ok((appended, revision))
    }

    /// A commit on JetStream: its conditions are checked, an intent names everything, the
    /// first record write is the guard (the commit point, by its condition), then the other
    /// records and the appends follow and the intent is dropped. A node that dies after the
    /// guard leaves the intent, and [`Storage::recover`] finishes it (writing kv records only
    /// over the revision the writer checked). A commit with conditions besides its guard (kv
    /// keys a call read) holds the lock of each kv space they are in, on every node (see
    /// [`JetStreamStorage::lock_space`]), from its checks to its last write, so no other
    /// commit can change those keys in between.
    async fn commit(&self, commit: Commit) -> Result<Committed, StorageError> {
        self.check_open()?;
        let Commit {
            checks,
            records,
            appends,
        } = commit;
        // Only commits with conditions besides the commit point's (kv keys read) need the
        // locks; the others (a completion and publishes) run side by side.
        let spaces: std::collections::BTreeSet<String> = checks
            .iter()
            .map(|c| c.space.clone())
            .chain(
                records
                    .iter()
                    .skip(1)
                    .filter(|r| r.expect != Expect::Any)
                    .map(|r| r.space.clone()),
            )
            .collect();
        let conditional = !spaces.is_empty();
        let _one_at_a_time = match conditional {
            true => Some(self.commit_lock.lock().await),
            false => None,
        };
        // In name order, so two writers never wait on each other's.
        let mut held = Vec::new();
        for space in &spaces {
            match self.lock_space(space).await {
                Ok(revision) => held.push((space.as_str(), revision)),
                Err(e) => {
                    self.unlock_spaces(&held).await;
                    return Err(e);
                }
            }
        }
        let done = self
            .commit_held(checks, records, appends, conditional, false)
            .await;
        match &done {
            // Nothing written, or all of it: the locks go back.
            Ok(_) | Err(StorageError::Conflict { .. }) => self.unlock_spaces(&held).await,
            // Maybe past the commit point with kv writes unfinished (an answer lost with the
            // server that took it): the locks are kept until they lapse, and whoever takes
            // one then finishes the commits touching its space first (`lock_space`). Given
            // back now, the next commit on the space read values this one had not written
            // yet, and recovery then kept the newer value: a lost kv update.
            Err(_) => {}
        }
        done
    }
    /// Creates each queue's stream with the topic's limits, or changes only the limits of one
    /// that exists (whatever else an operator tuned on it stays).
    async fn prepare_topic(
        &self,
        topic: &str,
        queues: u32,
        limits: QueueLimits,
    ) -> Result<(), StorageError> {
        for queue in 0..queues {
            let stream = self.queue_stream(topic, queue, false).await?;
            let wanted = self.queue_config(topic, queue, limits);
            self.apply_limits(&self.streams, (topic, queue), stream, wanted)
                .await?;
            // After the queue stream: an index stream made meanwhile on another node reads
            // the queue's age after it was made (see `index_stream`).
            self.prepare_index(topic, queue, limits).await?;
        }
        Ok(())
    }

    /// Sets `max_age` of the id index's stream (`KV_WQ_IDS`) and the key index's (`WQ_KEYS`),
    /// when it changed: the server then deletes old entries itself, by age, with no request
    /// per entry. An entry is written just after its message, so it goes just after the last
    /// topic's copy could. Entries of messages deleted earlier (by size, after consumption or
    /// with their topic) stay until then; lookups check that the message is still there.
    async fn limit_index_age(&self, max_age_ms: Option<u64>) -> Result<(), StorageError> {
        let last = *self
            .index_age
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last == Some(max_age_ms) {
            return Ok(());
        }
        let max_age = Duration::from_millis(max_age_ms.unwrap_or(0));
        for name in [format!("KV_{IDS}"), KEYS.to_string()] {
            let mut stream = self
                .js
                .get_stream(&name)
                .await
                .map_err(|e| js_err(&format!("index stream {name}"), e))?;
            let mut config = stream
                .info()
                .await
                .map_err(|e| js_err(&format!("index stream {name}"), e))?
                .config
                .clone();
            let window = duplicate_window(max_age_ms);
            if (config.max_age, config.duplicate_window) == (max_age, window) {
                continue;
            }
            config.max_age = max_age;
            config.duplicate_window = window;
            self.js
                .update_stream(&config)
                .await
                .map_err(|e| js_err(&format!("index stream {name}"), e))?;
        }
        *self
            .index_age
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(max_age_ms);
        Ok(())
    }

    async fn announce(&self, channel: &str, payload: Vec<u8>) {
        // Core NATS, not JetStream: delivered to whoever listens now, kept nowhere.
        let _ = self
            .client
            .publish(format!("wqb.{}", enc(channel)), payload.into())
            .await;
    }

    async fn listen(&self, channel: &str) -> Option<futures::stream::BoxStream<'static, Vec<u8>>> {
        let sub = self
            .client
            .subscribe(format!("wqb.{}", enc(channel)))
            .await
            .ok()?;
        Some(sub.map(|m| m.payload.to_vec()).boxed())
    }

    async fn recover(&self, age: std::time::Duration) -> Result<usize, StorageError> {
        self.check_open()?;
        self.finish_intents(age, false).await
    }

    async fn finish_commits_of(&self, space: &str, prefix: &str) -> Result<usize, StorageError> {
        self.finish_commits_of(space, prefix).await
    }

    async fn unfinished_commits(
        &self,
        space: &str,
    ) -> Result<std::collections::HashSet<String>, StorageError> {
        self.check_open()?;
        self.unfinished_commits(space).await
    }

    fn recovery_age(&self) -> std::time::Duration {
        INTENT_AGE
    }

    /// On R1 streams, a read of at least 64 that goes on where a runner's reads of a backlog
    /// went is one pull request to a consumer left there (see `reads.rs`); any other read is
    /// direct gets.
    async fn read(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        if let Some(read) = self.read_on(topic, queue, from, limit).await {
            return Ok(read);
        }
        let read = self.read_direct(topic, queue, from, limit).await?;
        // Replicated streams keep direct gets: a reader's consumer is R1 on one of the
        // stream's servers, and no gain was measured for R3 (see README) that would be worth
        // its failover cases (a server killed under it, messages in flight on a reconnect).
        if self.replicas == 1
            && limit >= READER_MIN_LIMIT
            && read.len() == limit
            && let Some(last) = read.last()
        {
            self.keep_reader(topic, queue, from, last.offset + 1).await;
        }
        Ok(read)
    }

    /// The id's queue first (ids made by [`crate::storage::message_id_for`]: the message's
    /// subject, then an id entry of the layout before), then the global id bucket (other ids,
    /// and entries from before the per-queue index).
    async fn message_by_id(&self, id: MessageId) -> Result<Option<StoredMessage>, StorageError> {
        if let Some(m) = self.located(&id).await? {
            return Ok(Some(m));
        }
        let Some(raw) = self
            .ids
            .get(id.to_string())
            .await
            .map_err(|e| js_err("id lookup", e))?
        else {
            return Ok(None);
        };
        let at: Location = rmp_serde::from_slice(&raw)
            .map_err(|e| StorageError::Corrupt(format!("id index {id}: {e}")))?;
        self.message_at(&at.topic, at.queue, at.offset).await
    }

    async fn messages_by_key(
        &self,
        topic: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        // Entries from before the per-queue index are older: first.
        let filter = format!("wqk.{}.{}", enc(topic), enc(key));
        let found = self.scan(&self.keys, filter, limit).await?;
        let mut out = Vec::new();
        for m in found {
            let (queue, offset): (u32, u64) = rmp_serde::from_slice(&m.payload)
                .map_err(|e| StorageError::Corrupt(format!("key index: {e}")))?;
            out.extend(self.read_one(topic, queue, offset).await?);
        }
        if out.len() < limit {
            let more = self.keyed(topic, key, limit - out.len()).await?;
            out.extend(more);
        }
        Ok(out)
    }

    fn watch(&self, topic: &str) -> tokio::sync::watch::Receiver<u64> {
        self.watchers.subscribe(topic)
    }

    fn backend_name(&self) -> &'static str {
        "jetstream"
    }

    fn shared(&self) -> bool {
        true
    }

    /// News of another node's append is a core NATS message, sent at most once.
    fn recheck_idle(&self) -> Option<Duration> {
        Some(RECHECK_IDLE)
    }

    async fn high_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        match self.queue_stream(topic, queue, false).await? {
            Some(mut s) => Ok(s
                .info()
                .await
                .map_err(|e| js_err("high water", e))?
                .state
                .last_sequence),
            None => Ok(0),
        }
    }

    async fn low_water(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        match self.queue_stream(topic, queue, false).await? {
            Some(mut s) => Ok(low_water_of(
                &s.info().await.map_err(|e| js_err("low water", e))?.state,
            )),
            None => Ok(0),
        }
    }

    /// One stream info: first and last sequence and the bytes the stream holds.
    async fn extent(&self, topic: &str, queue: u32) -> Result<QueueExtent, StorageError> {
        match self.queue_stream(topic, queue, false).await? {
            Some(mut s) => {
                let state = &s.info().await.map_err(|e| js_err("extent", e))?.state;
                Ok(QueueExtent {
                    low_water: low_water_of(state),
                    high_water: state.last_sequence,
                    bytes: state.bytes,
                })
            }
            None => Ok(QueueExtent::default()),
        }
    }

    /// The server applies age and size limits itself (set by [`Storage::prepare_topic`]), so
    /// nothing is left to cut but what it already deleted; the index entries of what it
    /// deleted are purged here (see `index.rs`).
    async fn retention_cut(
        &self,
        topic: &str,
        queue: u32,
        _limits: QueueLimits,
        _now_ms: u64,
    ) -> Result<u64, StorageError> {
        self.purge_index(topic, queue).await
    }

    /// The stream's own purge up to a sequence: one request, not a delete per message.
    async fn truncate(&self, topic: &str, queue: u32, before: u64) -> Result<u64, StorageError> {
        let Some(mut stream) = self.queue_stream(topic, queue, false).await? else {
            return Ok(0);
        };
        let state = &stream
            .info()
            .await
            .map_err(|e| js_err("truncate", e))?
            .state;
        let (low, before) = (low_water_of(state), before.min(state.last_sequence));
        if before <= low {
            return Ok(low);
        }
        // Sequence = offset + 1; the purge keeps `before + 1` and up.
        stream
            .purge()
            .sequence(before + 1)
            .await
            .map_err(|e| js_err("truncate", e))?;
        self.purge_index(topic, queue).await?;
        Ok(before)
    }

    async fn get_record(&self, space: &str, key: &str) -> Result<Option<Record>, StorageError> {
        let latest = self.latest_record(&record_key(space, key)).await?;
        Ok(latest.and_then(|(revision, value)| value.map(|value| Record { revision, value })))
    }

    async fn list_records(
        &self,
        space: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StorageError> {
        self.list_inner(space, prefix, "", limit).await
    }

    async fn list_records_after(
        &self,
        space: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StorageError> {
        self.list_inner(space, prefix, after, limit).await
    }

    async fn put_record(
        &self,
        space: &str,
        key: &str,
        value: Option<Vec<u8>>,
        expect: Expect,
    ) -> Result<u64, StorageError> {
        self.check_open()?;
        self.write_record(space, key, value, expect).await
    }

    async fn put_blob(&self, key: &str, value: Option<Vec<u8>>) -> Result<(), StorageError> {
        self.check_open()?;
        match value {
            Some(bytes) => {
                let mut reader = std::io::Cursor::new(bytes);
                self.blobs
                    .put(key, &mut reader)
                    .await
                    .map_err(|e| js_err("blob", e))?;
            }
            None => match self.blobs.delete(key).await {
                Ok(()) => {}
                Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => {}
                Err(e) => return Err(js_err("blob", e)),
            },
        }
        Ok(())
    }

    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let mut object = match self.blobs.get(key).await {
            Ok(o) => o,
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(js_err("blob", e)),
        };
        let mut out = Vec::new();
        object
            .read_to_end(&mut out)
            .await
            .map_err(|e| js_err("blob", e))?;
        Ok(Some(out))
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.client.flush().await;
        self.notifier.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_encode_to_safe_tokens_and_back() {
        for s in ["", "orders", "a.b c/d*e>f=g:ü", "=", "-_x", "WQ_RECORDS"] {
            let e = enc(s);
            assert!(
                e.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'='),
                "{e}"
            );
            assert_eq!(dec(&e).unwrap(), s);
        }
        assert_ne!(stream_name("a", 1), stream_name("a=5F1", 0));
        assert!(dec("=Z").is_err() && dec("=4").is_err());
    }
}
