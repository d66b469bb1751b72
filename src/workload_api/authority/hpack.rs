//! An HPACK decoder (RFC 7541) whose cost is linear in the block it reads.
//!
//! Why not the decoder of the HPACK crate we encode with: loona-hpack builds
//! a Huffman table of 257 hash maps for *each* Huffman-coded string and then
//! decodes bit by bit with two map lookups per bit, so a 1.5 KB block of 480
//! empty Huffman strings cost about 6 ms of CPU, before the client had been
//! attested. Here the Huffman strings go to `httlib-huffman`, which decodes
//! with precomputed flat tables (a few nanoseconds a byte, nothing per
//! string), and the rest (integers, the static and dynamic tables) is a few
//! lines of bounded work. Every limit that keeps a hostile block cheap is
//! checked as the block is read: the number of fields, the decoded size of
//! the list, the length of integers, and the size of the dynamic table.

use std::collections::VecDeque;

use httlib_huffman::DecoderSpeed;

/// A decoded header list: (name, value) pairs in order.
pub(super) type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

/// Why a block cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Error {
    /// The block ends inside a representation.
    #[error("truncated header block")]
    Truncated,
    /// An integer does not fit the bounds HPACK peers use.
    #[error("oversized integer in header block")]
    IntegerOverflow,
    /// An index points outside both tables.
    #[error("header index {0} is out of range")]
    BadIndex(usize),
    /// A Huffman string is malformed (bad padding or EOS inside).
    #[error("invalid Huffman-coded string")]
    Huffman,
    /// A dynamic table size update is too large or misplaced.
    #[error("invalid dynamic table size update to {0}")]
    BadSizeUpdate(usize),
    /// More fields than allowed.
    #[error("more than {0} fields in one header block")]
    TooManyFields(usize),
    /// The decoded list is larger than allowed.
    #[error("header list decodes to more than {0} bytes")]
    ListTooLarge(usize),
}

/// The RFC 7541 per-entry overhead counted in table and list sizes.
const ENTRY_OVERHEAD: usize = 32;
/// Largest integer accepted: far above any table size, index or string
/// length that fits in a bounded block.
const MAX_INTEGER: usize = 1 << 24;

/// Limits applied while one block is decoded.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Most field representations in a block.
    pub(super) max_fields: usize,
    /// Largest decoded list (RFC 7541 sizes: name + value + 32 per field).
    pub(super) max_list_size: usize,
}

/// The decoding state of one connection: its dynamic table.
pub(super) struct Decoder {
    /// Newest entry first, as HPACK indexes them.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    /// The table's size in RFC 7541 terms.
    size: usize,
    /// The size the client last set with a size update.
    max_size: usize,
    /// The most the client may set: what the server advertised.
    allowed_max: usize,
}

impl Decoder {
    /// A decoder whose client may use a dynamic table of up to `allowed_max`
    /// bytes (the server's SETTINGS_HEADER_TABLE_SIZE, 4096 by default).
    pub(super) fn new(allowed_max: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: allowed_max,
            allowed_max,
        }
    }

    /// Decodes one complete header block.
    pub(super) fn decode(&mut self, block: &[u8], limits: Limits) -> Result<HeaderList, Error> {
        let mut reader = Reader { rest: block };
        let mut list = HeaderList::new();
        let mut list_size = 0usize;
        let mut at_start = true;
        while let Some(first) = reader.peek() {
            let field = match first {
                0x80.. => {
                    let index = reader.integer(7)?;
                    self.entry(index)?
                }
                0x40.. => {
                    let field = self.literal(&mut reader, 6)?;
                    self.insert(field.clone());
                    field
                }
                0x20.. => {
                    let size = reader.integer(5)?;
                    if !at_start || size > self.allowed_max {
                        return Err(Error::BadSizeUpdate(size));
                    }
                    self.max_size = size;
                    self.evict_to(size);
                    continue;
                }
                _ => self.literal(&mut reader, 4)?,
            };
            at_start = false;
            list_size = list_size.saturating_add(field.0.len() + field.1.len() + ENTRY_OVERHEAD);
            if list_size > limits.max_list_size {
                return Err(Error::ListTooLarge(limits.max_list_size));
            }
            if list.len() == limits.max_fields {
                return Err(Error::TooManyFields(limits.max_fields));
            }
            list.push(field);
        }
        Ok(list)
    }

    /// A field by index: 1 to 61 the static table, then the dynamic one.
    fn entry(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), Error> {
        if let Some(&(name, value)) = index.checked_sub(1).and_then(|i| STATIC_TABLE.get(i)) {
            return Ok((name.to_vec(), value.to_vec()));
        }
        index
            .checked_sub(STATIC_TABLE.len() + 1)
            .and_then(|i| self.table.get(i))
            .cloned()
            .ok_or(Error::BadIndex(index))
    }

    /// A literal field whose name index has a `prefix`-bit prefix.
    fn literal(&self, reader: &mut Reader<'_>, prefix: u8) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let name_index = reader.integer(prefix)?;
        let name = if name_index == 0 {
            reader.string()?
        } else {
            self.entry(name_index)?.0
        };
        Ok((name, reader.string()?))
    }

    /// Adds an entry, evicting the oldest ones to make room (RFC 7541 §4.4).
    fn insert(&mut self, field: (Vec<u8>, Vec<u8>)) {
        let size = field.0.len() + field.1.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        self.size += size;
        self.table.push_front(field);
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            let Some((name, value)) = self.table.pop_back() else {
                self.size = 0;
                return;
            };
            self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
        }
    }
}

/// A cursor over a block.
struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn byte(&mut self) -> Result<u8, Error> {
        let (&b, rest) = self.rest.split_first().ok_or(Error::Truncated)?;
        self.rest = rest;
        Ok(b)
    }

    /// An integer with a `prefix`-bit prefix (RFC 7541 §5.1).
    fn integer(&mut self, prefix: u8) -> Result<usize, Error> {
        let mask = (1u8 << prefix) - 1;
        let mut value = usize::from(self.byte()? & mask);
        if value < usize::from(mask) {
            return Ok(value);
        }
        let mut shift = 0;
        loop {
            // RFC 7541 §5.1: refuse over-long encodings (and never shift
            // past the word, whatever zero octets a client sends).
            if shift > 28 {
                return Err(Error::IntegerOverflow);
            }
            let octet = self.byte()?;
            value += usize::from(octet & 0x7f) << shift;
            if value > MAX_INTEGER {
                return Err(Error::IntegerOverflow);
            }
            if octet & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// A string literal, Huffman-coded or not (RFC 7541 §5.2). (httlib-huffman
    /// refuses an EOS inside a string but not every malformed padding; that is
    /// harmless here, as the server only ever sees our re-encoding.)
    fn string(&mut self) -> Result<Vec<u8>, Error> {
        let huffman = self.peek().ok_or(Error::Truncated)? & 0x80 != 0;
        let len = self.integer(7)?;
        if len > self.rest.len() {
            return Err(Error::Truncated);
        }
        let (raw, rest) = self.rest.split_at(len);
        self.rest = rest;
        if !huffman {
            return Ok(raw.to_vec());
        }
        let mut out = Vec::with_capacity(len * 8 / 5);
        httlib_huffman::decode(raw, &mut out, DecoderSpeed::FourBits)
            .map_err(|_| Error::Huffman)?;
        Ok(out)
    }
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_fields: 512,
        max_list_size: 64 << 10,
    };

    fn hex(s: &str) -> Vec<u8> {
        let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        ::hex::decode(clean).unwrap()
    }

    fn pairs(list: &HeaderList) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn the_rfc_7541_request_examples_with_huffman_decode_with_their_table() {
        // RFC 7541 C.4.1 to C.4.3: three requests on one connection.
        let mut d = Decoder::new(4096);
        let first = d
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"), LIMITS)
            .unwrap();
        assert_eq!(
            pairs(&first),
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
        let second = d
            .decode(&hex("8286 84be 5886 a8eb 1064 9cbf"), LIMITS)
            .unwrap();
        assert_eq!(
            pairs(&second)[3],
            (":authority".into(), "www.example.com".into())
        );
        assert_eq!(
            pairs(&second)[4],
            ("cache-control".into(), "no-cache".into())
        );
        let third = d
            .decode(
                &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
                LIMITS,
            )
            .unwrap();
        assert_eq!(
            pairs(&third)[4],
            ("custom-key".into(), "custom-value".into())
        );
        assert_eq!(d.size, 164, "the table size RFC 7541 C.4.3 gives");
    }

    #[test]
    fn a_flood_of_empty_huffman_fields_is_cheap_and_bounded() {
        // The attack block: 480 literals with Huffman-flagged empty strings.
        let block: Vec<u8> = std::iter::repeat_n([0x00, 0x80, 0x80], 480)
            .flatten()
            .collect();
        let started = std::time::Instant::now();
        for _ in 0..100 {
            let list = Decoder::new(4096).decode(&block, LIMITS).unwrap();
            assert_eq!(list.len(), 480);
        }
        // Debug builds included: loona-hpack took about 6 ms per block
        // optimised; this must be far below that.
        assert!(started.elapsed() < std::time::Duration::from_millis(200));
        let few = Limits {
            max_fields: 100,
            ..LIMITS
        };
        assert_eq!(
            Decoder::new(4096).decode(&block, few),
            Err(Error::TooManyFields(100))
        );
    }

    #[test]
    fn bad_blocks_are_refused() {
        let d = || Decoder::new(4096);
        assert_eq!(d().decode(&[0x80], LIMITS), Err(Error::BadIndex(0)));
        assert_eq!(d().decode(&[0xbe], LIMITS), Err(Error::BadIndex(62)));
        assert_eq!(
            d().decode(&[0x41, 0x05, b'a'], LIMITS),
            Err(Error::Truncated)
        );
        assert_eq!(
            d().decode(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0x7f], LIMITS),
            Err(Error::IntegerOverflow)
        );
        // Zero continuation octets forever must not shift out of the word.
        let mut long = vec![0x7f];
        long.extend([0x80; 20]);
        long.push(0x01);
        assert_eq!(d().decode(&long, LIMITS), Err(Error::IntegerOverflow));
        // A size update above what the server allows, or after a field.
        assert_eq!(
            d().decode(&[0x3f, 0xe1, 0x3f], LIMITS),
            Err(Error::BadSizeUpdate(8192))
        );
        assert_eq!(
            d().decode(&[0x82, 0x20], LIMITS),
            Err(Error::BadSizeUpdate(0))
        );
        // The EOS symbol (30 ones) inside a string.
        assert_eq!(
            d().decode(&[0x00, 0x84, 0xff, 0xff, 0xff, 0xff, 0x80], LIMITS),
            Err(Error::Huffman)
        );
    }

    #[test]
    fn a_list_that_expands_through_the_table_is_refused_past_its_limit() {
        let mut d = Decoder::new(4096);
        let value = vec![b'v'; 3000];
        let mut block = vec![0x40, 0x01, b'x', 0x7f];
        let mut len = value.len() - 127;
        while len >= 128 {
            block.push(0x80 | (len % 128) as u8);
            len /= 128;
        }
        block.push(len as u8);
        block.extend_from_slice(&value);
        block.extend(std::iter::repeat_n(0xbe, 40)); // 40 references to it
        let small = Limits {
            max_list_size: 16 << 10,
            ..LIMITS
        };
        assert_eq!(d.decode(&block, small), Err(Error::ListTooLarge(16 << 10)));
    }
}
