//! Reads on JetStream: scanning a stream by subject and listing KV records by prefix, bounded in
//! time.

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
        let message: NewMessage = rmp_serde::from_slice(&raw.payload)
            .map_err(|e| StorageError::Corrupt(format!("message {topic}/{queue}/{offset}: {e}")))?;
        Ok(Some(StoredMessage {
            topic: topic.to_string(),
            offset,
            stored_at: epoch_ms(&raw.time),
            message,
        }))
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
            .read(topic, queue, offset, 1)
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
