//! Splitting a back-channel message's destinations by the next hop each is
//! reached through (seed 004: one copy per next hop, listing the
//! destinations behind it), as the server does when it starts a job and
//! every MLM on the way does again for its subtree.

use std::collections::BTreeMap;
use std::future::Future;

use rs_protocol::RsId;

/// The destinations grouped by next hop (`route` looks one up), and those
/// with no known route, in the order given.
pub async fn split<H, E, F, Fut>(
    dests: impl IntoIterator<Item = RsId>,
    mut route: F,
) -> Result<(BTreeMap<H, Vec<RsId>>, Vec<RsId>), E>
where
    H: Ord,
    F: FnMut(RsId) -> Fut,
    Fut: Future<Output = Result<Option<H>, E>>,
{
    let mut by_hop: BTreeMap<H, Vec<RsId>> = BTreeMap::new();
    let mut unknown = Vec::new();
    for d in dests {
        match route(d.clone()).await? {
            Some(hop) => by_hop.entry(hop).or_default().push(d),
            None => unknown.push(d),
        }
    }
    Ok((by_hop, unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn destinations_go_under_their_hop_and_the_unknown_apart() {
        let id = |s: &str| RsId::new(s).unwrap();
        let routes = [
            ("acme.p1", "acme.m1"),
            ("acme.p2", "acme.m1"),
            ("acme.p3", "acme.m2"),
        ];
        let (by_hop, unknown) = split(
            ["acme.p3", "acme.p1", "acme.p9", "acme.p2"].map(id),
            |d| async move {
                Ok::<_, ()>(
                    routes
                        .iter()
                        .find(|(p, _)| *p == d.as_str())
                        .map(|(_, h)| h.to_string()),
                )
            },
        )
        .await
        .unwrap();
        assert_eq!(by_hop["acme.m1"], [id("acme.p1"), id("acme.p2")]);
        assert_eq!(by_hop["acme.m2"], [id("acme.p3")]);
        assert_eq!(unknown, [id("acme.p9")]);
    }
}
