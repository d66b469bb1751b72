//! `sigil instances --tree`: instances drawn under their parent instance.

use std::collections::{HashMap, HashSet};

use crate::proto::sigil::admin::v1::Instance;

/// The rows of a tree: each instance's index in `instances` and the
/// box-drawing prefix to draw before it. Roots are the instances whose
/// parent is not among those listed; children follow their parent, in the
/// order given.
pub fn tree_order(instances: &[Instance]) -> Vec<(usize, String)> {
    let ids: HashSet<&str> = instances.iter().map(|i| i.instance_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (index, i) in instances.iter().enumerate() {
        let parent = i.parent_instance_id.as_str();
        if parent.is_empty() || parent == i.instance_id || !ids.contains(parent) {
            roots.push(index);
        } else {
            children.entry(parent).or_default().push(index);
        }
    }
    let mut rows = Vec::with_capacity(instances.len());
    let mut seen = vec![false; instances.len()];
    for root in roots {
        walk(instances, &children, root, "", None, &mut seen, &mut rows);
    }
    // A parent cycle (which the daemon should never report) has no root;
    // show its members as roots rather than drop them.
    for index in 0..instances.len() {
        if !seen[index] {
            walk(instances, &children, index, "", None, &mut seen, &mut rows);
        }
    }
    rows
}

/// Adds `index` and its subtree. `last` is `None` for a root, else whether
/// this node is its parent's last child; `indent` is what the ancestors
/// draw.
fn walk(
    instances: &[Instance],
    children: &HashMap<&str, Vec<usize>>,
    index: usize,
    indent: &str,
    last: Option<bool>,
    seen: &mut [bool],
    rows: &mut Vec<(usize, String)>,
) {
    if seen[index] {
        return;
    }
    seen[index] = true;
    let (prefix, below) = match last {
        None => (String::new(), String::new()),
        Some(false) => (format!("{indent}├─ "), format!("{indent}│  ")),
        Some(true) => (format!("{indent}└─ "), format!("{indent}   ")),
    };
    rows.push((index, prefix));
    let kids = children
        .get(instances[index].instance_id.as_str())
        .map_or(&[][..], Vec::as_slice);
    for (n, &child) in kids.iter().enumerate() {
        let last = n + 1 == kids.len();
        walk(instances, children, child, &below, Some(last), seen, rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, parent: &str) -> Instance {
        Instance {
            instance_id: id.into(),
            parent_instance_id: parent.into(),
            ..Instance::default()
        }
    }

    fn ids_in_tree(instances: &[Instance]) -> Vec<String> {
        tree_order(instances)
            .into_iter()
            .map(|(i, prefix)| format!("{prefix}{}", instances[i].instance_id))
            .collect()
    }

    #[test]
    fn a_tree_puts_children_under_their_parent() {
        let instances = [
            instance("c1", "root"),
            instance("root", ""),
            instance("other", "gone"),
            instance("g1", "c1"),
            instance("c2", "root"),
        ];
        assert_eq!(
            ids_in_tree(&instances),
            ["root", "├─ c1", "│  └─ g1", "└─ c2", "other"],
        );
    }

    #[test]
    fn a_parent_cycle_still_shows_every_instance() {
        let instances = [instance("a", "b"), instance("b", "a")];
        let rows = ids_in_tree(&instances);
        assert_eq!(rows.len(), 2, "{rows:?}");
    }
}
