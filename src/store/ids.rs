//! Event ids pgstore assigns itself (migration 0006).
//!
//! An event appended without an id gets a UUIDv8 made of the store's random 48-bit prefix and the
//! event's global sequence:
//!
//! ```text
//! bytes 0..6   the store's prefix (pgstore.store.id_prefix)
//! bytes 6..8   0x80 0x00: version 8
//! bytes 8..16  the sequence, under the RFC 4122 variant bits (10)
//! ```
//!
//! Such ids are unique by construction (one sequence, one event), so they need no entry in the
//! unique index on event ids, the most expensive part of an append after the stream's own index.
//! Every id of this store's form lies in one range, which the partial index leaves out
//! (`pgstore.assigned_event_id`); a client that sends one back is answered from the event at
//! that sequence.

use uuid::Uuid;

/// The sequence bits: the low 62 bits of the last 8 bytes.
const SEQ_MASK: u64 = (1 << 62) - 1;
/// The variant bits (10) over them.
const VARIANT: u64 = 1 << 63;
/// Bytes 6 and 7: version 8.
const VERSION: [u8; 2] = [0x80, 0x00];

/// This store's event-id range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignedIds {
    prefix: [u8; 6],
}

impl AssignedIds {
    /// The range of the store with this prefix (`pgstore.store.id_prefix`, below 2^48).
    pub const fn new(prefix: u64) -> AssignedIds {
        let b = prefix.to_be_bytes();
        AssignedIds {
            prefix: [b[2], b[3], b[4], b[5], b[6], b[7]],
        }
    }

    /// The id of the event at `seq`.
    pub fn id(&self, seq: u64) -> Uuid {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&self.prefix);
        b[6..8].copy_from_slice(&VERSION);
        b[8..].copy_from_slice(&((seq & SEQ_MASK) | VARIANT).to_be_bytes());
        Uuid::from_bytes(b)
    }

    /// The sequence an id of this store's range stands for; `None` for any other id.
    pub fn seq(&self, id: &Uuid) -> Option<u64> {
        let b = id.as_bytes();
        if b[..6] != self.prefix || b[6..8] != VERSION || b[8] & 0xc0 != 0x80 {
            return None;
        }
        let low = u64::from_be_bytes(b[8..].try_into().expect("8 bytes"));
        Some(low & SEQ_MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_sequence_and_nothing_else_is_in_range() {
        let ids = AssignedIds::new(0x1baf_4c17_f517);
        for seq in [1, 2, 255, 1 << 40, SEQ_MASK] {
            let id = ids.id(seq);
            assert_eq!(ids.seq(&id), Some(seq));
            assert_eq!(id.get_version_num(), 8);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
        assert_eq!(
            ids.id(1).to_string(),
            "1baf4c17-f517-8000-8000-000000000001"
        );
        // The range the migration's SQL function gives, end to end.
        assert_eq!(
            ids.id(0).to_string(),
            "1baf4c17-f517-8000-8000-000000000000"
        );
        assert_eq!(
            ids.id(SEQ_MASK).to_string(),
            "1baf4c17-f517-8000-bfff-ffffffffffff"
        );
        assert_eq!(ids.seq(&Uuid::now_v7()), None);
        assert_eq!(AssignedIds::new(0x1baf_4c17_f518).seq(&ids.id(7)), None);
        let mut other_variant = *ids.id(7).as_bytes();
        other_variant[8] = 0xc0;
        assert_eq!(ids.seq(&Uuid::from_bytes(other_variant)), None);
    }
}
