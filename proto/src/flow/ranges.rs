//! The set of packet numbers received, as disjoint inclusive ranges, for
//! acknowledgements and duplicate detection. Bounded: only the highest
//! [`MAX_RANGES`] ranges are kept; anything below the lowest kept number
//! counts as already received (a packet that old is a duplicate or
//! hopelessly late, and its sender has declared it lost long ago).

use std::collections::BTreeMap;

/// Most ranges kept (and sent in one acknowledgement).
pub const MAX_RANGES: usize = 32;

#[derive(Debug, Default, Clone)]
pub struct Ranges {
    /// start → end, inclusive, disjoint and not adjacent.
    map: BTreeMap<u64, u64>,
    /// Everything below this counts as received.
    floor: u64,
}

impl Ranges {
    pub fn contains(&self, pn: u64) -> bool {
        pn < self.floor
            || self
                .map
                .range(..=pn)
                .next_back()
                .is_some_and(|(_, end)| pn <= *end)
    }

    /// Adds `pn`; false if it was already there.
    pub fn insert(&mut self, pn: u64) -> bool {
        if self.contains(pn) {
            return false;
        }
        let mut start = pn;
        let mut end = pn;
        if let Some((&s, &e)) = self.map.range(..pn).next_back() {
            if e + 1 == pn {
                start = s;
                self.map.remove(&s);
            }
        }
        if let Some(&e) = self.map.get(&(pn + 1)) {
            end = e;
            self.map.remove(&(pn + 1));
        }
        self.map.insert(start, end);
        while self.map.len() > MAX_RANGES {
            let (&s, &e) = self.map.iter().next().expect("not empty");
            self.map.remove(&s);
            self.floor = self.floor.max(e + 1);
        }
        true
    }

    pub fn largest(&self) -> Option<u64> {
        self.map.values().next_back().copied()
    }

    /// The ranges, highest first.
    pub fn descending(&self) -> Vec<(u64, u64)> {
        self.map.iter().rev().map(|(s, e)| (*s, *e)).collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeSet;

    #[test]
    fn matches_a_set_model() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut r = Ranges::default();
        let mut model = BTreeSet::new();
        for _ in 0..20_000 {
            let pn = rng.gen_range(0..400u64);
            let (floor, was) = (r.floor, model.contains(&pn));
            let fresh = r.insert(pn);
            if pn >= floor {
                assert_eq!(fresh, !was, "pn {pn}");
            } else {
                // Below the floor counts as received.
                assert!(!fresh, "pn {pn}");
            }
            model.insert(pn);
            assert!(r.len() <= MAX_RANGES);
            for (s, e) in r.descending() {
                for x in s..=e {
                    assert!(model.contains(&x));
                }
            }
        }
    }

    #[test]
    fn merges_neighbours_and_bounds_itself() {
        let mut r = Ranges::default();
        for pn in [5, 7, 6, 1, 2] {
            assert!(r.insert(pn));
        }
        assert!(!r.insert(6));
        assert_eq!(r.descending(), vec![(5, 7), (1, 2)]);
        assert_eq!(r.largest(), Some(7));
        for i in 0..100u64 {
            r.insert(100 + 2 * i);
        }
        assert_eq!(r.len(), MAX_RANGES);
        // Forgotten ranges count as received.
        assert!(r.contains(1) && !r.insert(5));
    }
}
