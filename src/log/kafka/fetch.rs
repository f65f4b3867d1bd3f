//! A consumer's fetched messages, taken a batch at a time.
//!
//! librdkafka's event API hands a consumer's messages over one at a time
//! (`rd_kafka_queue_poll`: a lock, a clock read and an event for each),
//! which costs some 8% of a metric runner's CPU. Its batch call,
//! `rd_kafka_consume_batch_queue`, takes many under one lock, but on the
//! consumer queue it would also serve what the event API leaves to the
//! application: a rebalance (with no rebalance callback, which the
//! `rdkafka` crate does not set, librdkafka then unassigns every
//! partition) or an offset commit's reply (which it aborts on).
//!
//! So each partition's fetched messages are forwarded to a queue of their
//! own, a [`FetchQueue`], which holds nothing but messages, partitions'
//! ends and fetch errors, and is taken a batch at a time. The consumer
//! queue keeps the rest and is polled through the event API as before. A
//! partition is split off before its fetching starts (before an
//! assignment takes it), and librdkafka keeps an application's forward
//! across assignments (`RD_KAFKA_Q_F_FWD_APP`), so a partition's messages
//! all come through one queue. A partition that was not split off (one
//! added to the topic while the reader runs, say) comes through the
//! consumer queue, in order, as before.

use std::ffi::{CString, c_void};
use std::ptr;
use std::sync::Arc;

use rdkafka::bindings as rd;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use tokio::sync::Notify;

/// The most messages one batch call takes (its array of pointers is kept
/// between calls).
const BATCH: usize = 4096;

/// One message of a batch, borrowed until the next.
pub(super) enum Fetched<'a> {
    Record {
        partition: i32,
        offset: i64,
        timestamp_ms: i64,
        key: Option<&'a [u8]>,
        value: &'a [u8],
    },
    /// The partition has no more records for now.
    End(i32),
    Failed(KafkaError),
}

/// A queue the partitions' fetched messages are forwarded to.
pub(super) struct FetchQueue {
    queue: *mut rd::rd_kafka_queue_t,
    /// Notified from librdkafka's thread as messages arrive.
    arrived: Arc<Notify>,
    /// Room for the messages of one batch call.
    taken: Vec<*mut rd::rd_kafka_message_t>,
}

// SAFETY: librdkafka's queues may be used from any thread; the message
// pointers in `taken` live only within one `take`.
unsafe impl Send for FetchQueue {}

impl FetchQueue {
    /// A queue of `client`'s (a consumer); it must be dropped before the
    /// client is.
    pub(super) fn new(client: *mut rd::rd_kafka_t) -> FetchQueue {
        let arrived = Arc::new(Notify::new());
        // SAFETY: `client` is a live consumer. The callback's opaque is
        // the `Notify`, which lives until `drop` has turned the callback
        // off (under the queue's lock, which librdkafka holds while it
        // calls the callback).
        let queue = unsafe {
            let queue = rd::rd_kafka_queue_new(client);
            rd::rd_kafka_queue_cb_event_enable(
                queue,
                Some(on_arrival),
                Arc::as_ptr(&arrived).cast_mut().cast(),
            );
            queue
        };
        FetchQueue {
            queue,
            arrived,
            taken: Vec::with_capacity(BATCH),
        }
    }

    /// Forwards `partition`'s fetched messages to this queue; false when
    /// librdkafka has no such partition (its messages then come through
    /// the consumer queue).
    pub(super) fn split(&self, client: *mut rd::rd_kafka_t, topic: &str, partition: i32) -> bool {
        let Ok(topic) = CString::new(topic) else {
            return false;
        };
        // SAFETY: `client` is this queue's consumer; the partition's queue
        // handle is released at once, its forward stays.
        unsafe {
            let of_partition = rd::rd_kafka_queue_get_partition(client, topic.as_ptr(), partition);
            if of_partition.is_null() {
                return false;
            }
            rd::rd_kafka_queue_forward(of_partition, self.queue);
            rd::rd_kafka_queue_destroy(of_partition);
        }
        true
    }

    /// What wakes a reader waiting for this queue. A message that arrives
    /// between a look at the queue and the wait leaves a permit, so the
    /// wait ends at once.
    pub(super) fn arrivals(&self) -> Arc<Notify> {
        self.arrived.clone()
    }

    /// Hands `each` up to `max` (at most [`BATCH`]) of the messages
    /// waiting, in order, without waiting; how many.
    pub(super) fn take(&mut self, max: usize, mut each: impl FnMut(Fetched<'_>)) -> usize {
        let room = max.min(BATCH);
        self.taken.clear();
        self.taken.reserve(room);
        // SAFETY: the array has room for `room` pointers; librdkafka
        // writes that many at most and says how many (-1 only for a queue
        // that is not a consumer's).
        let taken = unsafe {
            let n = rd::rd_kafka_consume_batch_queue(self.queue, 0, self.taken.as_mut_ptr(), room);
            let n = usize::try_from(n).unwrap_or(0);
            self.taken.set_len(n);
            n
        };
        // Every message goes back to librdkafka, even if `each` panics.
        let messages = Taken(&mut self.taken);
        for &message in messages.0.iter() {
            // SAFETY: librdkafka's message, alive until destroyed below.
            each(unsafe { fetched(&*message) });
        }
        taken
    }
}

impl Drop for FetchQueue {
    fn drop(&mut self) {
        // SAFETY: the callback is turned off before the `Notify` can go;
        // the queue handle is this struct's own.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.queue, None, ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.queue);
        }
    }
}

/// A batch's messages, destroyed when it is.
struct Taken<'a>(&'a mut Vec<*mut rd::rd_kafka_message_t>);

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        for message in self.0.drain(..) {
            // SAFETY: each was taken by the batch call and is destroyed once.
            unsafe { rd::rd_kafka_message_destroy(message) };
        }
    }
}

/// # Safety
///
/// `message` is a message librdkafka handed over and has not destroyed.
unsafe fn fetched(message: &rd::rd_kafka_message_t) -> Fetched<'_> {
    match message.err {
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR => {
            let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
            // SAFETY: (the caller's) a live message; its key and payload
            // are `key_len` and `len` bytes, or null.
            unsafe {
                let timestamp = rd::rd_kafka_message_timestamp(message, &mut kind);
                Fetched::Record {
                    partition: message.partition,
                    offset: message.offset,
                    // As the `rdkafka` crate reads it: -1 is none.
                    timestamp_ms: match kind {
                        _ if timestamp == -1 => 0,
                        rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE => 0,
                        _ => timestamp,
                    },
                    key: bytes(message.key.cast(), message.key_len),
                    value: bytes(message.payload.cast(), message.len).unwrap_or_default(),
                }
            }
        }
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__PARTITION_EOF => Fetched::End(message.partition),
        error => Fetched::Failed(KafkaError::MessageConsumption(error.into())),
    }
}

/// # Safety
///
/// `at` is null or points to `len` bytes that outlive `'a`.
unsafe fn bytes<'a>(at: *const u8, len: usize) -> Option<&'a [u8]> {
    // SAFETY: as the caller promises.
    (!at.is_null()).then(|| unsafe { std::slice::from_raw_parts(at, len) })
}

/// librdkafka's call when a message is put on the queue (from its own
/// threads, under the queue's lock).
unsafe extern "C" fn on_arrival(_client: *mut rd::rd_kafka_t, arrived: *mut c_void) {
    // SAFETY: the opaque is the queue's `Notify` (see `FetchQueue::new`).
    let arrived = unsafe { &*arrived.cast_const().cast::<Notify>() };
    arrived.notify_one();
}
