//! The interactions processor: every `interaction.recorded` of a person,
//! newest first, within a retention period of event time (contract §4,
//! "Interactions").
//!
//! # Layout
//! - [`InteractionsFold`]: the [`Fold`] that specifies the processor: what
//!   a person's list holds after any events, configured with the retention
//!   and byte budget from `topology.yaml`.
//! - [`InteractionsState`]: that list, plus [`InteractionsState::page`] for
//!   cursor paging.
//! - [`timeline`]: how the list is stored, sub-keyed in bounded chunks
//!   (head, chunk and id rows), the handler the runtime runs, and
//!   [`timeline::read_page`] (`ListInteractions`). Proven equal to the fold
//!   by `tests/timeline.rs`.
//! - [`InteractionItem`]: one stored interaction, with the contract's
//!   defaults applied (channel = source platform, direction = inbound).
//!
//! # Guarantees
//! [`InteractionsFold::apply`] is pure and synchronous: no IO, no clock.
//! - Items are kept sorted newest event time first, ties by `id` ascending,
//!   whatever order events arrive in.
//! - Retention is measured in event time against
//!   [`InteractionsState::latest_time`], the max event time of every event
//!   applied to the person (every type). An interaction older than
//!   `latest_time - retention` is not stored (not an error), and stored ones
//!   that fall behind that horizon are pruned. Because `latest_time` only
//!   grows, the stored set is exactly "every applied interaction not older
//!   than the final horizon", so a replay gives the live state.
//! - Ids are unique in the list: an interaction whose `id` is already stored
//!   (a resend whose earlier copy left the dedupe window, so the runtime's
//!   [`Tracked`](waymark_core::Tracked) applied it again) replaces the stored
//!   item, like an upsert by key. A resend that is itself older than the
//!   horizon is not stored and leaves the list as it is.
//! - Duplicates within the dedupe window and redelivered records never reach
//!   the fold (the runtime's `Tracked` filters them).
//! - A person's items count at most `max_bytes`
//!   ([`InteractionItem::stored_bytes`]); beyond it the oldest are dropped,
//!   exactly as if they had left the retention.

use std::cmp::Ordering;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use waymark_core::{ContentType, Direction, Event, EventData, Fold, Identity, InteractionKind};
use waymark_runtime::plugin::{BuildContext, BuildError, ProcessorFactory, TableSpec};
use waymark_topology::{ParamKind, ParamSpec};

pub mod timeline;

/// The processor's name.
pub const NAME: &str = "interactions";

/// The state encoding of its rows ([`waymark_runtime::row`]): raise it
/// whenever a row type of [`timeline`] (or a type in it, such as
/// [`InteractionItem`]) changes shape.
///
/// 1: the first; 2: [`waymark_core::Tracked`] records the sources applied.
pub const STATE_ENCODING: u32 = 2;

/// The interactions processor as a plugin: [`InteractionsFold`]'s items
/// over the events, stored sub-keyed ([`timeline`]). Its parameters:
/// `retention` (a duration, default [`DEFAULT_RETENTION`]), `max_bytes`
/// (a person's byte budget, default [`DEFAULT_MAX_BYTES`]) and
/// `chunk_bytes` (the budget of one stored chunk, default
/// [`timeline::DEFAULT_CHUNK_BYTES`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct InteractionsProcessor;

impl ProcessorFactory for InteractionsProcessor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn params(&self) -> &'static [ParamSpec] {
        const PARAMS: &[ParamSpec] = &[
            ParamSpec {
                name: "retention",
                kind: ParamKind::Duration,
            },
            ParamSpec {
                name: "chunk_bytes",
                kind: ParamKind::Bytes,
            },
            ParamSpec {
                name: "max_bytes",
                kind: ParamKind::Bytes,
            },
        ];
        PARAMS
    }

    fn tables(&self) -> &'static [TableSpec] {
        // Head, chunk and id rows all start with the position they reflect.
        const TABLES: &[TableSpec] = &[TableSpec::tracked(
            "",
            "person id (head), `<person id>/c/<chunk>` or `<person id>/i/<event id>`",
        )];
        TABLES
    }

    fn state_encoding(&self) -> u32 {
        STATE_ENCODING
    }

    fn build(
        &self,
        ctx: &BuildContext<'_>,
    ) -> Result<std::sync::Arc<dyn waymark_runtime::Handler>, BuildError> {
        let spec = ctx.spec();
        let retention = match spec.duration_param("retention") {
            Some(d) => Duration::from_std(d).unwrap_or(Duration::MAX),
            None => DEFAULT_RETENTION,
        };
        let fold = InteractionsFold::new(retention)
            .with_max_bytes(spec.bytes_param("max_bytes").unwrap_or(DEFAULT_MAX_BYTES));
        let chunk_bytes = spec
            .bytes_param("chunk_bytes")
            .unwrap_or(timeline::DEFAULT_CHUNK_BYTES);
        Ok(std::sync::Arc::new(timeline::TimelineHandler::new(
            NAME,
            ctx.table(""),
            ctx.encoding(),
            ctx.dedupe_window(),
            timeline::Limits::of(&fold, chunk_bytes),
        )))
    }
}

/// The contract's default retention: 365 days of event time.
pub const DEFAULT_RETENTION: Duration = Duration::days(365);

/// The retention horizon: interactions older than this are not stored.
pub(crate) fn horizon(latest: Option<DateTime<Utc>>, retention: Duration) -> Option<DateTime<Utc>> {
    latest.and_then(|t| t.checked_sub_signed(retention))
}

/// The default byte budget of one person's stored interactions: 64 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// Folds `interaction.recorded` events into an [`InteractionsState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InteractionsFold {
    retention: Duration,
    max_bytes: u64,
}

impl InteractionsFold {
    /// A fold keeping interactions not older than `retention` before the
    /// person's latest event time. A negative retention is treated as zero.
    pub fn new(retention: Duration) -> Self {
        Self {
            retention: retention.max(Duration::zero()),
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    /// The same fold with a byte budget of `max_bytes` per person: when
    /// the stored interactions of a person count more
    /// ([`InteractionItem::stored_bytes`]), the oldest are dropped, as if
    /// they had left the retention.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The retention this fold applies.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// The byte budget per person this fold applies.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}

impl Default for InteractionsFold {
    /// [`DEFAULT_RETENTION`].
    fn default() -> Self {
        Self::new(DEFAULT_RETENTION)
    }
}

/// One stored interaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InteractionItem {
    /// The event id.
    pub id: String,
    /// The event time.
    pub time: DateTime<Utc>,
    /// The channel; the source platform when the event named none, empty
    /// when it had neither (an event addressed by `person_id` only).
    pub channel: String,
    /// What kind of interaction.
    pub kind: InteractionKind,
    /// What it carried.
    pub content_type: ContentType,
    /// The content, if any.
    pub content: Option<String>,
    /// The direction; inbound when the event named none.
    pub direction: Direction,
    /// The actor's identity, if the event had one.
    pub source: Option<Identity>,
}

impl InteractionItem {
    /// The item an `interaction.recorded` event stores, with the contract's
    /// defaults applied; `None` for other events.
    pub fn from_event(event: &Event) -> Option<Self> {
        let EventData::InteractionRecorded {
            kind,
            content_type,
            content,
            channel,
            direction,
        } = &event.data
        else {
            return None;
        };
        Some(InteractionItem {
            id: event.id.clone(),
            time: event.time,
            channel: channel.clone().unwrap_or_else(|| {
                event
                    .source
                    .as_ref()
                    .map(|s| s.platform.clone())
                    .unwrap_or_default()
            }),
            kind: *kind,
            content_type: *content_type,
            content: content.clone(),
            direction: direction.unwrap_or_default(),
            source: event.source.clone(),
        })
    }

    /// Where `(time, id)` stands relative to this item in list order
    /// (newest time first, then id ascending): `Less` when it comes after.
    pub(crate) fn order(&self, time: DateTime<Utc>, id: &str) -> Ordering {
        time.cmp(&self.time).then_with(|| self.id.as_str().cmp(id))
    }

    /// What the item counts against a person's byte budget
    /// ([`InteractionsFold::max_bytes`]): its strings plus a fixed 48 bytes
    /// for the rest; close to, and never far below, its stored size.
    pub fn stored_bytes(&self) -> u64 {
        let source = self
            .source
            .as_ref()
            .map_or(0, |s| s.platform.len() + s.platform_id.len());
        let content = self.content.as_ref().map_or(0, String::len);
        (48 + self.id.len() + self.channel.len() + content + source) as u64
    }
}

/// One person's interactions.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InteractionsState {
    /// The max event time of every event applied to the person (every type);
    /// the retention horizon is measured back from it.
    pub latest_time: Option<DateTime<Utc>>,
    /// Stored interactions, newest event time first, ties by id ascending;
    /// ids are unique.
    pub items: Vec<InteractionItem>,
}

/// A paging cursor: the `(time, id)` of the last item of a page.
pub type Cursor = (DateTime<Utc>, String);

impl InteractionsState {
    /// One page of interactions, in list order (newest first).
    ///
    /// - `since` (inclusive) and `until` (exclusive) bound the event time.
    /// - `after` is the cursor returned with the previous page: the page
    ///   starts right after that `(time, id)` in list order, so it is stable
    ///   while new interactions arrive.
    /// - At most `limit` items are returned; a `limit` of 0 is treated as 1
    ///   so a caller can never loop without progress.
    ///
    /// Returns the items and, when more items match, the cursor of the next
    /// page (the `(time, id)` of the last returned item).
    pub fn page(
        &self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        after: Option<(DateTime<Utc>, &str)>,
        limit: usize,
    ) -> (Vec<&InteractionItem>, Option<Cursor>) {
        let limit = limit.max(1);
        let items = &self.items;
        let mut start = until.map_or(0, |u| items.partition_point(|it| it.time >= u));
        if let Some((time, id)) = after {
            start = start.max(items.partition_point(|it| it.order(time, id) != Ordering::Greater));
        }
        let end = since.map_or(items.len(), |s| items.partition_point(|it| it.time >= s));
        if start >= end {
            return (Vec::new(), None);
        }
        let stop = end.min(start.saturating_add(limit));
        let page: Vec<&InteractionItem> = items[start..stop].iter().collect();
        let next = (stop < end).then(|| {
            let last = &items[stop - 1];
            (last.time, last.id.clone())
        });
        (page, next)
    }

    pub(crate) fn horizon(&self, retention: Duration) -> Option<DateTime<Utc>> {
        horizon(self.latest_time, retention)
    }
}

impl Fold for InteractionsFold {
    type State = InteractionsState;

    fn apply(&self, state: &mut InteractionsState, event: &Event) {
        let latest = match state.latest_time {
            Some(t) if t >= event.time => t,
            _ => event.time,
        };
        state.latest_time = Some(latest);
        let horizon = state.horizon(self.retention);

        if let Some(item) = InteractionItem::from_event(event) {
            let in_retention = horizon.is_none_or(|h| item.time >= h);
            if in_retention {
                state.items.retain(|it| it.id != item.id);
                let at = state
                    .items
                    .partition_point(|it| it.order(item.time, &item.id) == Ordering::Less);
                state.items.insert(at, item);
            }
        }

        if let Some(h) = horizon {
            let keep = state.items.partition_point(|it| it.time >= h);
            state.items.truncate(keep);
        }
        let mut bytes: u64 = state.items.iter().map(InteractionItem::stored_bytes).sum();
        while bytes > self.max_bytes {
            match state.items.pop() {
                Some(oldest) => bytes -= oldest.stored_bytes(),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn day(d: u32) -> DateTime<Utc> {
        t(&format!("2026-01-{d:02}T00:00:00Z"))
    }

    fn interaction(id: &str, time: DateTime<Utc>) -> Event {
        Event {
            id: id.into(),
            time,
            source: Some(Identity::new("telegram", "42")),
            person_id: None,
            data: EventData::InteractionRecorded {
                kind: InteractionKind::Message,
                content_type: ContentType::Text,
                content: Some(format!("text of {id}")),
                channel: None,
                direction: None,
            },
        }
    }

    fn other(id: &str, time: DateTime<Utc>) -> Event {
        Event {
            id: id.into(),
            time,
            source: Some(Identity::new("web", "1")),
            person_id: None,
            data: EventData::JourneyCompleted {
                journey_id: "j".into(),
            },
        }
    }

    fn fold_all(fold: &InteractionsFold, events: &[Event]) -> InteractionsState {
        let mut s = InteractionsState::default();
        for e in events {
            fold.apply(&mut s, e);
        }
        s
    }

    fn ids(items: &[&InteractionItem]) -> Vec<String> {
        items.iter().map(|i| i.id.clone()).collect()
    }

    fn all_ids(s: &InteractionsState) -> Vec<String> {
        s.items.iter().map(|i| i.id.clone()).collect()
    }

    #[test]
    fn defaults_channel_to_source_platform_and_direction_to_inbound() {
        let s = fold_all(&InteractionsFold::default(), &[interaction("a", day(1))]);
        let item = &s.items[0];
        assert_eq!(item.channel, "telegram");
        assert_eq!(item.direction, Direction::Inbound);
        assert_eq!(item.source, Some(Identity::new("telegram", "42")));
        assert_eq!(item.content.as_deref(), Some("text of a"));
        assert_eq!(
            (item.kind, item.content_type),
            (InteractionKind::Message, ContentType::Text)
        );
    }

    #[test]
    fn explicit_channel_and_direction_are_kept() {
        let mut e = interaction("a", day(1));
        e.data = EventData::InteractionRecorded {
            kind: InteractionKind::Call,
            content_type: ContentType::None,
            content: None,
            channel: Some("support-line".into()),
            direction: Some(Direction::Outbound),
        };
        let s = fold_all(&InteractionsFold::default(), &[e]);
        assert_eq!(s.items[0].channel, "support-line");
        assert_eq!(s.items[0].direction, Direction::Outbound);
        assert_eq!(s.items[0].content, None);
    }

    #[test]
    fn channel_is_empty_without_source() {
        let mut e = interaction("a", day(1));
        e.source = None;
        let s = fold_all(&InteractionsFold::default(), &[e]);
        assert_eq!(s.items[0].channel, "");
        assert_eq!(s.items[0].source, None);
    }

    #[test]
    fn newest_first_ties_by_id_whatever_the_arrival_order() {
        let s = fold_all(
            &InteractionsFold::default(),
            &[
                interaction("m", day(2)),
                interaction("z", day(3)),
                interaction("b", day(2)),
                interaction("a", day(1)),
                interaction("c", day(2)),
            ],
        );
        assert_eq!(all_ids(&s), ["z", "b", "c", "m", "a"]);
    }

    #[test]
    fn latest_time_tracks_every_event_type() {
        let s = fold_all(
            &InteractionsFold::default(),
            &[
                interaction("a", day(2)),
                other("o", day(9)),
                interaction("b", day(5)),
            ],
        );
        assert_eq!(s.latest_time, Some(day(9)));
        assert_eq!(all_ids(&s), ["b", "a"]);
    }

    #[test]
    fn older_than_retention_is_not_stored_but_the_horizon_itself_is() {
        let fold = InteractionsFold::new(Duration::days(5));
        let s = fold_all(
            &fold,
            &[
                other("o", day(10)),
                interaction("old", t("2026-01-04T23:59:59Z")),
                interaction("edge", day(5)),
            ],
        );
        assert_eq!(all_ids(&s), ["edge"]);
    }

    #[test]
    fn stored_items_are_pruned_when_any_later_event_moves_the_horizon() {
        let fold = InteractionsFold::new(Duration::days(5));
        let mut s = fold_all(&fold, &[interaction("a", day(1)), interaction("b", day(4))]);
        assert_eq!(all_ids(&s), ["b", "a"]);
        fold.apply(&mut s, &other("o", day(8)));
        assert_eq!(all_ids(&s), ["b"]);
        // an event older than latest does not move the horizon back
        fold.apply(&mut s, &other("p", day(2)));
        assert_eq!(s.latest_time, Some(day(8)));
        assert_eq!(all_ids(&s), ["b"]);
    }

    #[test]
    fn negative_retention_is_zero() {
        let fold = InteractionsFold::new(Duration::days(-1));
        assert_eq!(fold.retention(), Duration::zero());
        let s = fold_all(&fold, &[interaction("a", day(2)), interaction("b", day(2))]);
        assert_eq!(all_ids(&s), ["a", "b"]);
    }

    #[test]
    fn a_reapplied_id_replaces_the_stored_item() {
        let fold = InteractionsFold::default();
        let mut resent = interaction("a", day(3));
        resent.data = EventData::InteractionRecorded {
            kind: InteractionKind::View,
            content_type: ContentType::None,
            content: None,
            channel: None,
            direction: None,
        };
        let s = fold_all(
            &fold,
            &[interaction("a", day(1)), interaction("b", day(2)), resent],
        );
        assert_eq!(all_ids(&s), ["a", "b"]);
        assert_eq!(s.items[0].time, day(3));
        assert_eq!(s.items[0].kind, InteractionKind::View);
    }

    #[test]
    fn a_resend_older_than_the_horizon_keeps_the_stored_item() {
        let fold = InteractionsFold::new(Duration::days(5));
        let s = fold_all(
            &fold,
            &[
                interaction("a", day(9)),
                other("o", day(10)),
                interaction("a", day(1)),
            ],
        );
        assert_eq!(all_ids(&s), ["a"]);
        assert_eq!(s.items[0].time, day(9));
    }

    fn sample() -> InteractionsState {
        // ids by day: 5:e, 4:c d, 3:b, 2:a  -> list order e, c, d, b, a
        fold_all(
            &InteractionsFold::default(),
            &[
                interaction("a", day(2)),
                interaction("b", day(3)),
                interaction("d", day(4)),
                interaction("c", day(4)),
                interaction("e", day(5)),
            ],
        )
    }

    #[test]
    fn page_without_bounds_walks_everything_with_cursors() {
        let s = sample();
        let (p1, c1) = s.page(None, None, None, 2);
        assert_eq!(ids(&p1), ["e", "c"]);
        assert_eq!(c1, Some((day(4), "c".to_string())));
        let c1 = c1.unwrap();
        let (p2, c2) = s.page(None, None, Some((c1.0, &c1.1)), 2);
        assert_eq!(ids(&p2), ["d", "b"]);
        let c2 = c2.unwrap();
        let (p3, c3) = s.page(None, None, Some((c2.0, &c2.1)), 2);
        assert_eq!(ids(&p3), ["a"]);
        assert_eq!(c3, None);
    }

    #[test]
    fn exact_last_page_has_no_cursor() {
        let s = sample();
        let (p, c) = s.page(None, None, None, 5);
        assert_eq!(ids(&p), ["e", "c", "d", "b", "a"]);
        assert_eq!(c, None);
        assert_eq!(s.page(None, None, None, 4).1, Some((day(3), "b".into())));
    }

    #[test]
    fn since_is_inclusive_and_until_is_exclusive() {
        let s = sample();
        let (p, c) = s.page(Some(day(3)), Some(day(5)), None, 10);
        assert_eq!(ids(&p), ["c", "d", "b"]);
        assert_eq!(c, None);
        let (p, c) = s.page(Some(day(3)), Some(day(5)), None, 2);
        assert_eq!(ids(&p), ["c", "d"]);
        let c = c.unwrap();
        let (p, c) = s.page(Some(day(3)), Some(day(5)), Some((c.0, &c.1)), 2);
        assert_eq!(ids(&p), ["b"]);
        assert_eq!(c, None);
    }

    #[test]
    fn cursor_is_stable_when_newer_items_arrive() {
        let mut s = sample();
        let (_, c) = s.page(None, None, None, 2);
        InteractionsFold::default().apply(&mut s, &interaction("new", day(6)));
        InteractionsFold::default().apply(&mut s, &interaction("cc", day(4)));
        let c = c.unwrap();
        let (p, _) = s.page(None, None, Some((c.0, &c.1)), 10);
        assert_eq!(ids(&p), ["cc", "d", "b", "a"]);
    }

    #[test]
    fn cursor_of_a_removed_item_still_positions_the_page() {
        let s = sample();
        let (p, _) = s.page(None, None, Some((day(4), "cz")), 10);
        assert_eq!(ids(&p), ["d", "b", "a"]);
    }

    #[test]
    fn empty_ranges_and_zero_limit() {
        let s = sample();
        assert_eq!(s.page(Some(day(5)), Some(day(5)), None, 10), (vec![], None));
        assert_eq!(s.page(Some(day(9)), None, None, 10), (vec![], None));
        assert_eq!(
            InteractionsState::default().page(None, None, None, 10),
            (vec![], None)
        );
        let (p, c) = s.page(None, None, None, 0);
        assert_eq!(ids(&p), ["e"]);
        assert_eq!(c, Some((day(5), "e".into())));
    }
}
