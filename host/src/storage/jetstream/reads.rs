//! Reads on JetStream: a queue by direct gets or, where a runner goes through a backlog, through
//! a pull consumer left where its last read ended ([`Reader`]); scanning a stream by subject
//! and listing KV records by prefix, bounded in time.

use super::*;

impl JetStreamStorage {
    /// The message at `offset` of a queue an index entry points at: a direct get, else (a
    /// replica behind, or deleted by retention while its index entry stays) the stream's
    /// leader, which has every acknowledged message still kept.
    pub(super) async fn message_at(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> Result<Option<StoredMessage>, StorageError> {
        if let Some(m) = self.read_one(topic, queue, offset).await? {
            return Ok(Some(m));
        }
        let Some(stream) = self.queue_stream(topic, queue, false).await? else {
            return Ok(None);
        };
        let raw = match stream.get_raw_message(offset + 1).await {
            Ok(raw) => raw,
            Err(e) if no_message(&e) => return Ok(None),
            Err(e) => return Err(js_err("message by id", e)),
        };
        let at = epoch_ms(&raw.time);
        stored_message(topic, queue, raw.sequence, at, &raw.payload).map(Some)
    }

    /// Reads a queue with a direct get per message, up to `limit` in flight: from a replica,
    /// else the leader; below the low water, from the first message kept; a read ends before
    /// a message purged since its stream info.
    pub(super) async fn read_direct(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let Some(mut stream) = self.queue_stream(topic, queue, false).await? else {
            return Ok(Vec::new());
        };
        let state = &stream.info().await.map_err(|e| js_err("read", e))?.state;
        let last = state.last_sequence;
        // Below the low water (purged by retention): start at the first message kept.
        let from = from.max(low_water_of(state));
        let end = last.min(from.saturating_add(limit as u64));
        let gets = (from + 1..=end).map(|seq| {
            let stream = stream.clone();
            async move {
                match stream.direct_get(seq).await {
                    Ok(raw) => Ok(Some((epoch_ms(&raw.time), raw.payload))),
                    // Direct gets may be answered by a replica that has not applied the newest
                    // messages yet: the leader, whose state said they are there, is asked.
                    // Not there either: purged since (a read ends before it).
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
                        match stream.get_raw_message(seq).await {
                            Ok(raw) => Ok(Some((epoch_ms(&raw.time), raw.payload))),
                            Err(e) if no_message(&e) => Ok(None),
                            Err(e) => Err(js_err(&format!("read {seq}"), e)),
                        }
                    }
                    Err(e) => Err(js_err(&format!("read {seq}"), e)),
                }
            }
        });
        let found: Vec<Option<(u64, bytes::Bytes)>> = futures::stream::iter(gets)
            .buffered(READ_AHEAD)
            .try_collect()
            .await?;
        let mut out = Vec::with_capacity(found.len());
        for (seq, payload) in (from + 1..).zip(found) {
            let Some((stored_at, payload)) = payload else {
                break;
            };
            out.push(stored_message(topic, queue, seq, stored_at, &payload)?);
        }
        Ok(out)
    }

    /// `limit` messages of a queue from `from` through a reader left at `from` (see
    /// [`Reader`]), one pull request. `None`, and the caller reads with direct gets: a read
    /// under [`READER_MIN_LIMIT`], no reader there, one idle for half its consumer's life, or
    /// one that failed or did not start at `from` (both dropped). The reader is out of the
    /// cache while it reads: a read cut short (its caller dropped, an error) leaves none
    /// behind whose consumer delivered past what was returned.
    pub(super) async fn read_on(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        limit: usize,
    ) -> Option<Vec<StoredMessage>> {
        // Small reads (lookups, `limit` 0) never move a reader: a pull delivers at least one.
        if limit < READER_MIN_LIMIT {
            return None;
        }
        let reader = {
            let mut readers = lock(&self.readers);
            let kept = readers.get_mut(&(topic.to_string(), queue))?;
            let at = kept.readers.iter().position(|r| r.next == from)?;
            kept.readers.remove(at)
        };
        // Its consumer may have lapsed on the server, which then drops a pull unanswered.
        if reader.used.elapsed() > READER_IDLE / 2 {
            reader.forget();
            return None;
        }
        match self.pull(topic, queue, &reader, limit).await {
            // Not at `from` (a purge below it, or messages delivered but never received):
            // the direct read starts where a direct read does.
            Ok((read, false)) if read.is_empty() => {
                reader.forget();
                None
            }
            Ok((read, whole)) => {
                self.pulled.fetch_add(1, Ordering::Relaxed);
                if whole {
                    let next = read.last().map_or(from, |m| m.offset + 1);
                    let reader = Reader {
                        next,
                        used: std::time::Instant::now(),
                        ..reader
                    };
                    put_reader(&self.readers, topic, queue, reader);
                } else {
                    reader.forget();
                }
                Some(read)
            }
            Err(e) => {
                // A slow or failing server: no new reader for a while, not one per read.
                tracing::debug!(topic, queue, error = %e, "reader dropped");
                reader.forget();
                backoff(&self.readers, topic, queue);
                None
            }
        }
    }

    /// One pull request of `limit` messages (no wait: what is there now) to `reader`'s
    /// consumer, and whether the reader may go on: a read stops before a hole (messages that
    /// retention deleted while the pull delivered, which a direct read would stop before
    /// too), and its consumer has then gone past it.
    async fn pull(
        &self,
        topic: &str,
        queue: u32,
        reader: &Reader,
        limit: usize,
    ) -> Result<(Vec<StoredMessage>, bool), StorageError> {
        let mut batch = reader
            .consumer
            .fetch()
            .max_messages(limit)
            .messages()
            .await
            .map_err(|e| js_err("read", e))?;
        let mut out: Vec<StoredMessage> = Vec::with_capacity(limit);
        let collect = async {
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| js_err("read", e))?;
                let info = m.info().map_err(|e| js_err("read", e))?;
                let offset = info.stream_sequence.saturating_sub(1);
                // In stream order from exactly where the reader stood, with no hole.
                let expected = out.last().map_or(reader.next, |p| p.offset + 1);
                if offset != expected {
                    return Ok(false);
                }
                let at = epoch_ms(&info.published);
                out.push(stored_message(
                    topic,
                    queue,
                    info.stream_sequence,
                    at,
                    &m.payload,
                )?);
            }
            Ok::<_, StorageError>(true)
        };
        let whole = tokio::time::timeout(READER_TIMEOUT, collect)
            .await
            .map_err(|_| js_err("read", "timed out"))??;
        Ok((out, whole))
    }

    /// Notes that a full direct read of a backlog ended at `next`; the second such read in a
    /// row (one that began where one ended: a runner going through a backlog, or a listing
    /// paged on) leaves a reader there: an ephemeral pull consumer starting at that message,
    /// made in the background, one at a time per queue. Best effort: without one, reads are
    /// direct gets; after a failure to make or pull one, the queue gets none for
    /// [`READER_BACKOFF`].
    pub(super) async fn keep_reader(&self, topic: &str, queue: u32, from: u64, next: u64) {
        {
            let mut readers = lock(&self.readers);
            let kept = readers.entry((topic.to_string(), queue)).or_default();
            let in_a_row = kept.ends.contains(&from);
            kept.ends.retain(|&e| e != from);
            if kept.ends.len() >= READERS_PER_QUEUE {
                kept.ends.remove(0);
            }
            kept.ends.push(next);
            if !in_a_row
                || kept.creating
                || kept
                    .backoff
                    .is_some_and(|until| until > std::time::Instant::now())
            {
                return;
            }
            kept.creating = true;
        }
        let Ok(Some(stream)) = self.queue_stream(topic, queue, false).await else {
            lock(&self.readers)
                .entry((topic.to_string(), queue))
                .or_default()
                .creating = false;
            return;
        };
        let config = jetstream::consumer::pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: next + 1,
            },
            ack_policy: jetstream::consumer::AckPolicy::None,
            replay_policy: jetstream::consumer::ReplayPolicy::Instant,
            inactive_threshold: READER_IDLE,
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        };
        let (readers, topic) = (self.readers.clone(), topic.to_string());
        tokio::spawn(async move {
            match stream.create_consumer(config).await {
                Ok(consumer) => {
                    let used = std::time::Instant::now();
                    let reader = Reader {
                        stream,
                        consumer,
                        next,
                        used,
                    };
                    put_reader(&readers, &topic, queue, reader);
                }
                Err(e) => {
                    tracing::debug!(topic, queue, error = %e, "no reader");
                    backoff(&readers, &topic, queue);
                }
            }
            lock(&readers).entry((topic, queue)).or_default().creating = false;
        });
    }

    /// How many readers this node keeps, over all queues (each one consumer on the server).
    pub fn readers_kept(&self) -> usize {
        lock(&self.readers).values().map(|q| q.readers.len()).sum()
    }

    /// The message at exactly `offset`, if a replica serving direct gets has it (`None` also
    /// when retention deleted it: a read from below the low water starts above `offset`).
    pub(super) async fn read_one(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> Result<Option<StoredMessage>, StorageError> {
        Ok(self
            .read_direct(topic, queue, offset, 1)
            .await?
            .into_iter()
            .find(|m| m.offset == offset))
    }

    /// Messages of `stream` whose subject matches `filter`, at most `limit`, in stream order.
    pub(super) async fn scan(
        &self,
        stream: &Stream,
        filter: String,
        limit: usize,
    ) -> Result<Vec<async_nats::jetstream::Message>, StorageError> {
        // What exists now is the answer: writes that land during the scan (a hot space, say
        // cursors being committed) would otherwise keep it going.
        let last = stream
            .clone()
            .info()
            .await
            .map_err(|e| js_err("scan", e))?
            .state
            .last_sequence;
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: filter,
                deliver_policy: DeliverPolicy::All,
                replay_policy: jetstream::consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("scan consumer", e))?;
        if consumer.cached_info().num_pending == 0 || limit == 0 {
            return Ok(Vec::new());
        }
        let mut messages = consumer.messages().await.map_err(|e| js_err("scan", e))?;
        let mut out = Vec::new();
        let collect = async {
            while let Some(m) = messages.next().await {
                let m = m.map_err(|e| js_err("scan", e))?;
                let (pending, seq) = m
                    .info()
                    .map(|i| (i.pending, i.stream_sequence))
                    .unwrap_or((0, last));
                if seq > last {
                    break;
                }
                out.push(m);
                if pending == 0 || seq == last || out.len() >= limit {
                    break;
                }
            }
            Ok::<_, StorageError>(())
        };
        tokio::time::timeout(SCAN_TIMEOUT, collect)
            .await
            .map_err(|_| js_err("scan", "timed out"))??;
        Ok(out)
    }

    /// The records of a space: which subjects exist now (stream info with a subject filter),
    /// then the last value of each from the stream's leader. A consumer-based listing cannot
    /// tell, in a space being written, when it has seen everything.
    pub(super) async fn list_inner(
        &self,
        space: &str,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Record)>, StorageError> {
        let filter = format!("$KV.{RECORDS}.{}.*", enc(space));
        let subjects: Vec<String> = self
            .records_stream
            .info_with_subjects(&filter)
            .await
            .map_err(|e| js_err("list", e))?
            .map_ok(|(subject, _)| subject)
            .try_collect()
            .await
            .map_err(|e| js_err("list", e))?;
        let mut wanted = Vec::new();
        for subject in subjects {
            let Some(encoded) = subject.rsplit('.').next() else {
                continue;
            };
            let key = dec(encoded)?;
            if key.starts_with(prefix) && (after.is_empty() || key.as_str() > after) {
                wanted.push((key, subject));
            }
        }
        wanted.sort();
        let stream = &self.records_stream;
        let gets = wanted.into_iter().map(|(key, subject)| async move {
            match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => Ok(Some((key, m))),
                // Purged since the listing.
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(js_err("list", e)),
            }
        });
        // Values are fetched in key order, a few ahead, until `limit` live records are found:
        // a page costs its own records (and the deleted ones among them), not the space.
        let mut found = std::pin::pin!(futures::stream::iter(gets).buffered(READ_AHEAD));
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(next) = found.next().await else {
                break;
            };
            let Some((key, m)) = next? else {
                continue;
            };
            if is_deletion_marker(&m) {
                continue;
            }
            out.push((
                key,
                Record {
                    revision: m.sequence,
                    value: m.payload.to_vec(),
                },
            ));
        }
        Ok(out)
    }
}

/// A queue's reader: an ephemeral pull consumer with no acks whose next message is at offset
/// `next` (sequence `next + 1`), left where a runner's reads of a backlog went, so the read
/// that goes on from there is one pull request for up to its limit, not a stream info and a
/// direct get per message. On the server it lapses after [`READER_IDLE`] without a pull; it
/// is not used once half of that has passed.
pub(super) struct Reader {
    stream: Stream,
    consumer: jetstream::consumer::PullConsumer,
    next: u64,
    used: std::time::Instant,
}

impl Reader {
    /// Deletes its consumer on the server, in the background (it lapses anyway).
    fn forget(self) {
        let name = self.consumer.cached_info().name.clone();
        tokio::spawn(async move {
            let _ = self.stream.delete_consumer(&name).await;
        });
    }
}

/// A queue's readers, at most [`READERS_PER_QUEUE`] (several may stand at one offset: runners
/// of different subscriptions each take one); where its last full direct reads ended; whether
/// one is being made; and until when it gets no new one after a failure.
#[derive(Default)]
pub(super) struct QueueReaders {
    readers: Vec<Reader>,
    ends: Vec<u64>,
    creating: bool,
    backoff: Option<std::time::Instant>,
}

/// The readers of each queue.
pub(super) type Readers = Arc<std::sync::Mutex<HashMap<(String, u32), QueueReaders>>>;

fn lock(readers: &Readers) -> std::sync::MutexGuard<'_, HashMap<(String, u32), QueueReaders>> {
    readers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keeps `reader` for its queue. Readers idle for half their consumer's life go (one made
/// after its runner had moved on, say), and past the bound the oldest; their consumers are
/// deleted on the server.
fn put_reader(readers: &Readers, topic: &str, queue: u32, reader: Reader) {
    let mut all = lock(readers);
    let kept = all.entry((topic.to_string(), queue)).or_default();
    let (idle, mut live): (Vec<Reader>, Vec<Reader>) = std::mem::take(&mut kept.readers)
        .into_iter()
        .partition(|r| r.used.elapsed() > READER_IDLE / 2);
    let mut gone = idle;
    if live.len() >= READERS_PER_QUEUE {
        gone.push(live.remove(0));
    }
    live.push(reader);
    kept.readers = live;
    drop(all);
    gone.into_iter().for_each(Reader::forget);
}

/// A queue gets no new reader for [`READER_BACKOFF`].
fn backoff(readers: &Readers, topic: &str, queue: u32) {
    lock(readers)
        .entry((topic.to_string(), queue))
        .or_default()
        .backoff = Some(std::time::Instant::now() + READER_BACKOFF);
}
