//! Property tests of the identity processor: redelivery changes nothing, a
//! batched replay through the documented preloading equals one live pass,
//! and the tables stay consistent.

mod common;

use proptest::prelude::*;
use waymark_core::EventData;
use waymark_identity::{resolve, MemoryView};

proptest! {
    /// Resolving an event again right after it (a redelivery) gives the same
    /// person and writes nothing.
    #[test]
    fn redelivery_changes_nothing(
        events in proptest::collection::vec(common::arb_event(), 0..40),
    ) {
        let mut view = MemoryView::new();
        for (i, e) in events.iter().enumerate() {
            let at = common::stamp(&events, i);
            let first = resolve(&mut view, &mut e.clone(), at).expect("valid").person;
            view.take_changes();
            let again = resolve(&mut view, &mut e.clone(), at).expect("valid").person;
            prop_assert_eq!(first, again);
            prop_assert!(view.take_changes().is_empty());
        }
    }

    /// Batches of any size, each preloaded only as the crate docs say and
    /// stored (postcard) in between, give the live persons and tables.
    #[test]
    fn batched_replay_equals_live(
        events in proptest::collection::vec(common::arb_event(), 0..40),
        cuts in proptest::collection::vec(0..41usize, 0..8),
    ) {
        let (persons, store) = common::live(&events);
        let mut batched = common::Store::default();
        prop_assert_eq!(common::run_batches(&mut batched, &events, &cuts), persons);
        prop_assert_eq!(batched, store);
    }

    /// Links stay consistent, and after a link both identities resolve to
    /// the source's person.
    #[test]
    fn tables_stay_consistent(
        events in proptest::collection::vec(common::arb_event(), 0..40),
    ) {
        let mut view = MemoryView::new();
        for (i, e) in events.iter().enumerate() {
            let at = common::stamp(&events, i);
            let person = resolve(&mut view, &mut e.clone(), at).expect("valid").person;
            if let EventData::IdentityLinked(linked) = &e.data {
                prop_assert_eq!(view.person_of(linked), Some(person));
                if e.person_id.is_none() {
                    let source = e.source.as_ref().expect("valid events have a source");
                    prop_assert_eq!(view.person_of(source), Some(person));
                }
            }
        }
        let mut store = common::Store::default();
        store.write(view.take_changes());
        common::check_invariants(&store);
    }
}
