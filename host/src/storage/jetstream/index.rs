//! Lookups by id and business key on JetStream. A message is appended on a subject that ends
//! in its id (`wqm.{topic}.{queue}.{id}`), so a lookup by id is one direct get of that subject's
//! last message, with no index entry per message. A message id carries its topic's tag and
//! queue ([`crate::storage::message_id_for`]), so that lookup asks the streams of that queue
//! number only. Business keys go to one index stream per queue (`WQX_{topic}_{queue}`, made at
//! the queue's first keyed message) beside the queue's own stream: the index goes with its
//! queue, by the same age limit and by a purge after each deletion (size, consumption, the
//! topic's deletion), with no request per entry.
//!
//! Entries of older layouts are still read, after the current one: id entries in the index
//! streams (written before ids went into subjects, and by nodes not yet upgraded during a
//! rolling upgrade), and the global id bucket (`KV_WQ_IDS`) and key stream (`WQ_KEYS`) for ids
//! made otherwise and for everything written before the per-queue index.

use std::collections::VecDeque;

use super::*;

/// How many (index sequence, queue high water) pairs a queue keeps for
/// [`JetStreamStorage::purge_index`].
const CHECKPOINTS: usize = 64;

pub(super) fn index_stream_name(topic: &str, queue: u32) -> String {
    format!("WQX_{}_{queue}", enc(topic))
}

/// An id entry's subject (the layout before ids went into message subjects; read only).
fn index_id_subject(topic: &str, queue: u32, id: &MessageId) -> String {
    format!("wqx.{}.{queue}.i.{id}", enc(topic))
}

fn key_subject(topic: &str, queue: u32, key: &str) -> String {
    format!("wqx.{}.{queue}.k.{}", enc(topic), enc(key))
}

/// Pairs of (index stream's last sequence, queue's high water) read in that order, oldest
/// first: every entry up to the sequence points below the high water (an entry is written
/// after its message is acknowledged).
pub(super) type Checkpoints = std::sync::Mutex<HashMap<(String, u32), VecDeque<(u64, u64)>>>;

impl JetStreamStorage {
    /// The configuration of a queue's index stream: the queue's age limit, no size limit (a
    /// purge follows the queue's), direct gets for lookups.
    pub(super) fn index_config(
        &self,
        topic: &str,
        queue: u32,
        limits: QueueLimits,
    ) -> stream::Config {
        stream::Config {
            name: index_stream_name(topic, queue),
            subjects: vec![format!("wqx.{}.{queue}.>", enc(topic))],
            num_replicas: self.replicas,
            allow_direct: true,
            max_age: Duration::from_millis(limits.max_age_ms.unwrap_or(0)),
            max_bytes: -1,
            duplicate_window: duplicate_window(limits.max_age_ms),
            ..Default::default()
        }
    }

    /// A queue's index stream; created when `create`, else `None` if it never existed.
    pub(super) async fn index_stream(
        &self,
        topic: &str,
        queue: u32,
        create: bool,
    ) -> Result<Option<Stream>, StorageError> {
        if let Some(s) = self
            .index_streams
            .lock()
            .await
            .get(&(topic.to_string(), queue))
        {
            return Ok(Some(s.clone()));
        }
        let name = index_stream_name(topic, queue);
        let config = if create {
            // A queue stream made before the topic's limits were known (an append) has none;
            // prepare_topic gives both the topic's.
            let limits = self.queue_age(topic, queue).await?;
            Some(self.index_config(topic, queue, limits))
        } else {
            None
        };
        let made = config.is_some();
        let found = self
            .cached_stream(&self.index_streams, (topic, queue), name, config)
            .await?;
        if made {
            // The topic's limits may have changed on another node between the read above and
            // the creation: that node's prepare_topic changes the queue stream first, then
            // the index stream if it exists, so reading the queue's age again here leaves the
            // index with the newest one either way.
            let wanted = self.index_config(topic, queue, self.queue_age(topic, queue).await?);
            self.apply_limits(&self.index_streams, (topic, queue), found.clone(), wanted)
                .await?;
        }
        Ok(found)
    }

    /// A queue stream's age limit, as its index stream's limits (none if it does not exist).
    async fn queue_age(&self, topic: &str, queue: u32) -> Result<QueueLimits, StorageError> {
        let Some(mut queue_stream) = self.queue_stream(topic, queue, false).await? else {
            return Ok(QueueLimits::default());
        };
        let age = queue_stream
            .info()
            .await
            .map_err(|e| js_err(&stream_name(topic, queue), e))?
            .config
            .max_age;
        Ok(QueueLimits {
            max_age_ms: (!age.is_zero())
                .then(|| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
            max_bytes: None,
        })
    }

    /// Gives a queue's index stream, if it has one, the queue's age limit (one made later
    /// reads it from the queue's stream).
    pub(super) async fn prepare_index(
        &self,
        topic: &str,
        queue: u32,
        limits: QueueLimits,
    ) -> Result<(), StorageError> {
        let Some(stream) = self.index_stream(topic, queue, false).await? else {
            return Ok(());
        };
        let wanted = self.index_config(topic, queue, limits);
        self.apply_limits(&self.index_streams, (topic, queue), Some(stream), wanted)
            .await
    }

    /// The key index entries of appended messages whose ids carry their place (the others go
    /// to the global index): one per business key, published with a `Nats-Msg-Id`, so a
    /// retried append writes it once within the duplicate window. A message without a key
    /// has none (its id is in its subject).
    pub(super) async fn index_entries(
        &self,
        topic: &str,
        messages: &[&NewMessage],
        appended: &[&Appended],
    ) -> Result<Vec<futures::future::BoxFuture<'static, Result<u64, String>>>, StorageError> {
        let mut pending = Vec::new();
        for (m, a) in messages.iter().zip(appended) {
            let Some(key) = &m.key else {
                continue;
            };
            self.index_stream(topic, a.queue, true).await?;
            let offset =
                rmp_serde::to_vec(&a.offset).map_err(|e| StorageError::Encode(e.to_string()))?;
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{}:k", m.id).as_str());
            pending.push(self.publish_future(key_subject(topic, a.queue, key), headers, offset));
        }
        Ok(pending)
    }

    /// The names of the streams one of whose subjects overlaps `filter`, a page (JetStream's
    /// 1 024) at a time.
    async fn stream_names(&self, filter: &str) -> Result<Vec<String>, StorageError> {
        let mut names = Vec::new();
        loop {
            let answer: serde_json::Value = self
                .js
                .request(
                    "STREAM.NAMES",
                    &serde_json::json!({"subject": filter, "offset": names.len()}),
                )
                .await
                .map_err(|e| js_err("stream names", e))?;
            if let Some(error) = answer.get("error") {
                return Err(js_err("stream names", error));
            }
            let page = answer["streams"].as_array().cloned().unwrap_or_default();
            let total = answer["total"].as_u64().unwrap_or(0);
            let more = !page.is_empty() && ((names.len() + page.len()) as u64) < total;
            names.extend(page.iter().filter_map(|n| n.as_str().map(str::to_string)));
            if !more {
                return Ok(names);
            }
        }
    }

    /// The topics with tag `tag` whose streams named `{prefix}{topic}_{queue}` are in `names`.
    fn topics_in(names: &[String], prefix: &str, queue: u32, tag: u16) -> Vec<String> {
        let suffix = format!("_{queue}");
        names
            .iter()
            .filter_map(|name| {
                let topic = dec(name.strip_prefix(prefix)?.strip_suffix(&suffix)?).ok()?;
                (crate::storage::topic_tag(&topic) == tag).then_some(topic)
            })
            .collect()
    }

    /// The message an id made by [`crate::storage::message_id_for`] names, in the streams of
    /// its queue whose topic has its tag (one request lists them): by its subject, one direct
    /// get; else by an id entry of the layout before in the queue's index stream (see the
    /// module's docs). `None`: not there (deleted, or an id made otherwise).
    pub(super) async fn located(
        &self,
        id: &MessageId,
    ) -> Result<Option<StoredMessage>, StorageError> {
        let Some((tag, queue)) = crate::storage::id_locator(id) else {
            return Ok(None);
        };
        // Every queue stream binds its queue's own subject, widened to id subjects or not (a
        // node not yet upgraded may have narrowed it again): its messages keep their subjects.
        let names = self.stream_names(&format!("wqm.*.{queue}")).await?;
        for topic in Self::topics_in(&names, "WQM_", queue, tag) {
            let Some(stream) = self.queue_stream(&topic, queue, false).await? else {
                continue;
            };
            if let Some(raw) = last_for_subject(&stream, &id_subject(&topic, queue, id)).await? {
                let at = epoch_ms(&raw.time);
                return stored_message(&topic, queue, raw.sequence, at, &raw.payload).map(Some);
            }
            let Some(index) = self.index_stream(&topic, queue, false).await? else {
                continue;
            };
            let subject = index_id_subject(&topic, queue, id);
            let Some(entry) = last_for_subject(&index, &subject).await? else {
                continue;
            };
            let offset: u64 = rmp_serde::from_slice(&entry.payload)
                .map_err(|e| StorageError::Corrupt(format!("id index {id}: {e}")))?;
            if let Some(m) = self.message_at(&topic, queue, offset).await? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Messages of `topic` with business key `key` from its queues' index streams, oldest
    /// first per queue, queues in order, at most `limit`.
    pub(super) async fn keyed(
        &self,
        topic: &str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let mut out = Vec::new();
        // The topic's queues with an index stream (made at a queue's first keyed message), in
        // queue order.
        let names = self
            .stream_names(&format!("wqx.{}.*.k.{}", enc(topic), enc(key)))
            .await?;
        let prefix = format!("WQX_{}_", enc(topic));
        let mut queues: Vec<u32> = names
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix)?.parse().ok())
            .collect();
        queues.sort_unstable();
        for queue in queues {
            if out.len() >= limit {
                break;
            }
            let Some(stream) = self.index_stream(topic, queue, false).await? else {
                continue;
            };
            let found = self
                .scan(&stream, key_subject(topic, queue, key), limit - out.len())
                .await?;
            for m in found {
                let offset: u64 = rmp_serde::from_slice(&m.payload)
                    .map_err(|e| StorageError::Corrupt(format!("key index: {e}")))?;
                out.extend(self.read_one(topic, queue, offset).await?);
            }
        }
        Ok(out)
    }

    /// Deletes the index entries of a queue whose messages are all below its low water, and
    /// returns that low water: records a checkpoint (the index's last sequence, then the
    /// queue's low and high water, in one stream info) and purges the index up to the newest
    /// checkpoint whose high water is at most the low water. Two or three requests per call,
    /// none per entry; entries of messages just deleted go by the next call whose checkpoint
    /// is behind the low water.
    pub(super) async fn purge_index(&self, topic: &str, queue: u32) -> Result<u64, StorageError> {
        let Some(mut index) = self.index_stream(topic, queue, false).await? else {
            return self.low_water(topic, queue).await;
        };
        let state = index
            .info()
            .await
            .map_err(|e| js_err("index purge", e))?
            .state
            .clone();
        let QueueExtent {
            low_water: low,
            high_water: high,
            ..
        } = self.extent(topic, queue).await?;
        let cut = {
            let mut all = self
                .index_checkpoints
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let points = all.entry((topic.to_string(), queue)).or_default();
            if points
                .back()
                .is_none_or(|&(seq, _)| seq < state.last_sequence)
            {
                if points.len() >= CHECKPOINTS {
                    // Every second one goes: the rest still spans the whole time since the
                    // oldest, more coarsely.
                    let mut i = 0;
                    points.retain(|_| {
                        i += 1;
                        i % 2 == 1
                    });
                }
                points.push_back((state.last_sequence, high));
            }
            let mut cut = None;
            while let Some(&(seq, h)) = points.front() {
                if h > low {
                    break;
                }
                cut = Some(seq);
                points.pop_front();
            }
            cut
        };
        if let Some(seq) = cut
            && seq >= state.first_sequence
        {
            index
                .purge()
                .sequence(seq + 1)
                .await
                .map_err(|e| js_err("index purge", e))?;
        }
        Ok(low)
    }
}

/// The last message on `subject` of `stream`: a direct get, else (a replica that has not
/// applied the newest messages yet) the stream's leader, so a message is found by id as soon
/// as its append was acknowledged. `None`: no message on that subject.
async fn last_for_subject(
    stream: &Stream,
    subject: &str,
) -> Result<Option<jetstream::message::StreamMessage>, StorageError> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
            match stream.get_last_raw_message_by_subject(subject).await {
                Ok(m) => Ok(Some(m)),
                Err(e) if no_message(&e) => Ok(None),
                Err(e) => Err(js_err("id lookup", e)),
            }
        }
        Err(e) => Err(js_err("id lookup", e)),
    }
}
