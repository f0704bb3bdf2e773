//! Queries by event type and tags (Dynamic Consistency Boundaries): what `Read`, `ReadFrom` and
//! `Subscribe` select and what an append condition looks for.
//!
//! An event matches an item when its type is one of the item's types (or the item names none)
//! and it carries every one of the item's tags; it matches the query when it matches any item. A
//! query without items matches everything.
//!
//! In SQL a query is one `jsonb` parameter (`[{"types": [...], "tags": [...]}, ...]`) turned into
//! rows once per statement ([`ITEMS_CTE`]) and checked per event ([`MATCHES`]), so that every
//! query shape shares one prepared statement. [`Query::prefilter`] adds an index-friendly
//! condition implied by the query: an event matching it carries one of the tags in the list, or
//! has one of the types, which the GIN index on tags and the `(event_type, seq)` index serve.

use serde::Serialize;

/// A validated query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// The alternatives (none: every event).
    pub items: Vec<QueryItem>,
}

/// One alternative: any of `types` (all when empty) and all of `tags`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueryItem {
    /// Event types, any of which matches (all when empty).
    pub types: Vec<String>,
    /// Tags the event must all carry.
    pub tags: Vec<String>,
}

/// What joins an event's tags on their way to `append_batch` and in the writer's memory (tags
/// cannot contain it).
pub const TAG_SEPARATOR: char = '\u{1f}';

/// The tags of an event as the writer holds them (joined by [`TAG_SEPARATOR`]; `None`: none).
pub fn split_tags(joined: Option<&str>) -> impl Iterator<Item = &str> + Clone {
    joined
        .unwrap_or_default()
        .split(TAG_SEPARATOR)
        .filter(|t| !t.is_empty())
}

/// The query's items as rows, once per statement (`$q` is the jsonb parameter).
pub const ITEMS_CTE: &str = "q AS MATERIALIZED (SELECT i.types, i.tags \
     FROM jsonb_to_recordset($Q::jsonb) AS i(types text[], tags text[]))";

/// Whether event `e` matches any item of `q` (see [`ITEMS_CTE`]).
pub const MATCHES: &str = "EXISTS (SELECT 1 FROM q \
     WHERE (cardinality(q.types) = 0 OR e.event_type = ANY(q.types)) AND e.tags @> q.tags)";

impl Query {
    /// Whether the query matches every event.
    pub fn matches_all(&self) -> bool {
        self.items.is_empty()
    }

    /// The query's items as SQL takes them (the jsonb parameter of [`ITEMS_CTE`], sent as a
    /// `db::JsonRef`). A query without items matches everything: it goes as one item without
    /// types or tags.
    pub fn to_value(&self) -> serde_json::Value {
        if self.items.is_empty() {
            serde_json::json!([{"types": [], "tags": []}])
        } else {
            serde_json::to_value(&self.items).unwrap_or_default()
        }
    }

    /// [`Query::to_value`] as text.
    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }

    /// Tags and types one of which every matching event has, when the query has such a
    /// necessary condition: each item contributes its first tag, or its types when it names no
    /// tag. `None` when some item names neither (it matches every event).
    pub fn prefilter(&self) -> Option<(Vec<String>, Vec<String>)> {
        if self.items.is_empty() {
            return None;
        }
        let (mut tags, mut types) = (Vec::new(), Vec::new());
        for item in &self.items {
            match (item.tags.first(), item.types.is_empty()) {
                (Some(t), _) => tags.push(t.clone()),
                (None, false) => types.extend(item.types.iter().cloned()),
                (None, true) => return None,
            }
        }
        Some((tags, types))
    }

    /// Whether an event with this type and these tags matches.
    pub fn matches<'a>(
        &self,
        event_type: &str,
        tags: impl Iterator<Item = &'a str> + Clone,
    ) -> bool {
        self.items.is_empty()
            || self.items.iter().any(|item| {
                (item.types.is_empty() || item.types.iter().any(|t| t == event_type))
                    && item.tags.iter().all(|want| tags.clone().any(|t| t == want))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(types: &[&str], tags: &[&str]) -> QueryItem {
        QueryItem {
            types: types.iter().map(|s| s.to_string()).collect(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn matching_follows_the_rules() {
        let q = Query {
            items: vec![item(&["A", "B"], &["x"]), item(&[], &["y", "z"])],
        };
        let m = |ty: &str, tags: &[&str]| q.matches(ty, tags.iter().copied());
        assert!(m("A", &["x"]));
        assert!(m("B", &["x", "w"]));
        assert!(!m("C", &["x"]), "type not in the item");
        assert!(!m("A", &[]), "tag missing");
        assert!(m("C", &["z", "y"]), "any type, all tags");
        assert!(!m("C", &["y"]), "one of the tags missing");
        assert!(Query::default().matches("anything", [].into_iter()));
        assert!(
            Query {
                items: vec![item(&[], &[])]
            }
            .matches("T", [].into_iter())
        );
    }

    #[test]
    fn the_prefilter_is_implied_by_every_item() {
        let q = Query {
            items: vec![item(&["A"], &["x", "y"]), item(&["B", "C"], &[])],
        };
        assert_eq!(
            q.prefilter(),
            Some((
                vec!["x".to_string()],
                vec!["B".to_string(), "C".to_string()]
            ))
        );
        assert_eq!(
            Query {
                items: vec![item(&[], &[])]
            }
            .prefilter(),
            None
        );
        assert_eq!(Query::default().prefilter(), None);
    }
}
