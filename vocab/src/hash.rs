//! FNV-1a (64-bit): a small, stable, dependency-free hash for names and
//! files. Not cryptographic; it tells apart plans and seeds parameters, it
//! does not authenticate anything.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0100_0000_01b3;

/// An FNV-1a hasher: feed bytes with [`Fnv1a::write`], read [`Fnv1a::finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(OFFSET)
    }
}

impl Fnv1a {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn write(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(PRIME);
        }
        self
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    Fnv1a::new().write(bytes).finish()
}

/// The plan hash: FNV-1a of `plan.ron`'s bytes as 16 hex digits. It stamps
/// the plan binary (`autopart run` refuses a binary built from another
/// plan) and heads the generated code.
pub fn plan_hash(plan_ron: &[u8]) -> String {
    format!("{:016x}", fnv1a(plan_ron))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_fnv1a_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        let mut h = Fnv1a::new();
        h.write(b"foo").write(b"bar");
        assert_eq!(h.finish(), fnv1a(b"foobar"));
        assert_eq!(plan_hash(b"a"), "af63dc4c8601ec8c");
    }
}
