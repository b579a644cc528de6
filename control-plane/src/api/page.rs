//! Pages of list calls (AIP-158): `page_size` and an opaque `page_token` in, the page and
//! `next_page_token` out.
//!
//! A token names the list it belongs to, a digest of the query it was made for (a token
//! of another selector or module is refused) and the key of the last item returned; the
//! next page starts after that key, so items that come and go between pages never make
//! another item repeat or go missing. Tokens are MACed with a secret the store keeps
//! (`Store::secret`), so they survive a restart, would be shared by replicas, and a
//! tampered one is refused.

use ring::hmac;
use tonic::Status;

use aviary_proto::digest::Sha256;

use crate::error::bad_field;

/// Largest `page_size` honoured; larger requests get this many.
pub(crate) const MAX_PAGE_SIZE: usize = 1000;

/// Signs and checks page tokens.
pub(crate) struct Pager {
    key: hmac::Key,
}

/// A validated page request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PageRequest {
    /// Items on this page at most.
    pub size: usize,
    /// Start after the item with this key (none: from the first).
    pub after: Option<String>,
}

/// One page of a list and the token of the next, if there are more items.
#[derive(Debug)]
pub(crate) struct Page<T> {
    /// The items, in list order.
    pub items: Vec<T>,
    /// `next_page_token`; empty on the last page.
    pub next: String,
}

impl Pager {
    /// A pager MACing with `secret`.
    pub(crate) fn new(secret: &[u8]) -> Pager {
        Pager {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Validates `page_size` and `page_token` of list `kind` for `query` (the request's
    /// filter, as text); `default` is the size of a page without `page_size`.
    pub(crate) fn request(
        &self,
        kind: &str,
        query: &str,
        page_size: i32,
        page_token: &str,
        default: usize,
    ) -> Result<PageRequest, Status> {
        let size = match page_size {
            0 => default,
            n if n < 0 => {
                return Err(bad_field(
                    "page_size",
                    format!("page_size must not be negative, not {n}"),
                ))
            }
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        if page_token.is_empty() {
            return Ok(PageRequest { size, after: None });
        }
        let refused = || bad_field("page_token", "page_token is not a token this list made");
        let bytes = hex_decode(page_token).ok_or_else(refused)?;
        if bytes.len() < 32 {
            return Err(refused());
        }
        let (body, mac) = bytes.split_at(bytes.len() - 32);
        hmac::verify(&self.key, body, mac).map_err(|_| refused())?;
        let body = std::str::from_utf8(body).map_err(|_| refused())?;
        let mut parts = body.splitn(3, '\0');
        let (Some(k), Some(q), Some(after)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(refused());
        };
        if k != kind || q != query_digest(query) {
            return Err(bad_field(
                "page_token",
                "page_token belongs to another list or query: repeat the request that made it",
            ));
        }
        Ok(PageRequest {
            size,
            after: Some(after.to_owned()),
        })
    }

    /// The token of the page after the item with key `last`.
    pub(crate) fn token(&self, kind: &str, query: &str, last: &str) -> String {
        let body = format!("{kind}\0{}\0{last}", query_digest(query));
        let mac = hmac::sign(&self.key, body.as_bytes());
        let mut out = crate::hex::encode(body.as_bytes());
        out.push_str(&crate::hex::encode(mac.as_ref()));
        out
    }

    /// Cuts the page `req` asks for out of `items` (in list order): those after the
    /// cursor, as `after(item, cursor)` says, at most `req.size` of them. `key` names an
    /// item for the next token.
    pub(crate) fn page<T>(
        &self,
        kind: &str,
        query: &str,
        req: &PageRequest,
        items: impl IntoIterator<Item = T>,
        key: impl Fn(&T) -> String,
        after: impl Fn(&T, &str) -> bool,
    ) -> Page<T> {
        let mut rest = items
            .into_iter()
            .filter(|item| req.after.as_deref().is_none_or(|c| after(item, c)));
        let items: Vec<T> = rest.by_ref().take(req.size).collect();
        let more = rest.next().is_some();
        let next = match items.last() {
            Some(last) if more => self.token(kind, query, &key(last)),
            _ => String::new(),
        };
        Page { items, next }
    }
}

fn query_digest(query: &str) -> String {
    Sha256::of(query.as_bytes()).hex()[..16].to_owned()
}

/// Page tokens are short: anything longer is not one of ours.
fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() > 4096 {
        return None;
    }
    crate::hex::decode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pager() -> Pager {
        Pager::new(&[7; 32])
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("gw-{i:03}")).collect()
    }

    fn after(item: &str, cursor: &str) -> bool {
        item > cursor
    }

    #[test]
    fn pages_cover_every_item_once_even_when_items_come_and_go_between_them() {
        let p = pager();
        let mut all = ids(25);
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let req = p.request("nodes", "region=eu", 10, &token, 500);
            let req = req.unwrap_or_else(|e| panic!("{e}"));
            let page = p.page(
                "nodes",
                "region=eu",
                &req,
                all.clone(),
                Clone::clone,
                |i, c| after(i, c),
            );
            seen.extend(page.items);
            if page.next.is_empty() {
                break;
            }
            token = page.next;
            // Between pages one node leaves and one joins before the cursor: neither
            // makes another repeat or vanish.
            all.retain(|id| id != "gw-020");
            all.insert(0, "gw-000a".into());
            all.sort();
        }
        let want: Vec<String> = ids(25).into_iter().filter(|id| id != "gw-020").collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn tampered_foreign_and_misused_tokens_are_refused() {
        let p = pager();
        let token = p.token("nodes", "", "gw-005");
        let mut tampered = token.clone().into_bytes();
        tampered[3] = if tampered[3] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap_or_default();
        for bad in [tampered.as_str(), "zz", "abc", ""] {
            let r = p.request("nodes", "", 10, bad, 500);
            if bad.is_empty() {
                assert!(r.is_ok());
            } else {
                assert_eq!(
                    r.err().map(|s| s.code()),
                    Some(tonic::Code::InvalidArgument)
                );
            }
        }
        let other_key = Pager::new(&[8; 32]).token("nodes", "", "gw-005");
        assert!(p.request("nodes", "", 10, &other_key, 500).is_err());
        assert!(
            p.request("rollouts", "", 10, &token, 500).is_err(),
            "another list"
        );
        assert!(
            p.request("nodes", "region=us", 10, &token, 500).is_err(),
            "another query"
        );
        let ok = p.request("nodes", "", 0, &token, 500);
        assert_eq!(
            ok.ok(),
            Some(PageRequest {
                size: 500,
                after: Some("gw-005".into())
            })
        );
        assert!(p.request("nodes", "", -1, "", 500).is_err());
        let big = p.request("nodes", "", 1_000_000, "", 500);
        assert_eq!(big.ok().map(|r| r.size), Some(MAX_PAGE_SIZE));
    }
}
