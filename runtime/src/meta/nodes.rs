//! Nodes (registration, heartbeats, down marks) and how commands name
//! their tenant.

use super::tx::Tx;
use stoker_proto::meta::{
    Done, MarkNodeDown, NodeHeartbeat, NodeRecord, RegisterNode, TenantRecord,
};

use super::records::{
    get, get_node, get_tenant, invalid, node_key, put, Applied, DEFAULT_TENANT, NODES_TABLE,
    TENANTS_TABLE,
};

/// Longest tenant id and name, node address, scope, label key or value.
const MAX_NAME: usize = 256;

/// The tenant a command names (empty: the default one), created on first
/// use when it is the default tenant.
pub(crate) fn resolve_tenant(txn: &Tx<'_>, tenant: &str) -> Applied<String> {
    let id = if tenant.is_empty() {
        DEFAULT_TENANT
    } else {
        tenant
    };
    if get_tenant(txn, id)?.is_some() {
        return Ok(id.to_string());
    }
    if id != DEFAULT_TENANT {
        return invalid(format!("unknown tenant {id}"));
    }
    Ok(id.to_string())
}

/// Writes the default tenant's record if it is missing (after validation).
pub(crate) fn ensure_tenant(txn: &Tx<'_>, id: &str) -> Applied<()> {
    if get_tenant(txn, id)?.is_none() {
        let record = TenantRecord {
            id: id.to_string(),
            name: id.to_string(),
            weight: 1,
            ..TenantRecord::default()
        };
        put(txn, TENANTS_TABLE, id.as_bytes(), &record)?;
    }
    Ok(())
}

pub(crate) fn register_node(txn: &Tx<'_>, c: &RegisterNode) -> Applied<Done> {
    if c.id == 0 {
        return invalid("node id must not be 0");
    }
    if c.addr.len() > MAX_NAME || c.scope.len() > MAX_NAME {
        return invalid(format!(
            "node address and scope must be at most {MAX_NAME} bytes"
        ));
    }
    if c.labels
        .iter()
        .any(|(k, v)| k.is_empty() || k.len() > MAX_NAME || v.len() > MAX_NAME)
    {
        return invalid(format!(
            "node label keys must be 1..={MAX_NAME} bytes and values at most {MAX_NAME}"
        ));
    }
    let previous: Option<NodeRecord> = get(txn, NODES_TABLE, &node_key(c.id))?;
    let record = NodeRecord {
        id: c.id,
        addr: c.addr.clone(),
        labels: c.labels.clone(),
        scope: c.scope.clone(),
        slots: c.slots,
        memory_bytes: c.memory_bytes,
        scheduler: c.scheduler,
        worker: c.worker,
        up: true,
        last_heartbeat_ms: c.time_ms,
        registered_ms: previous.as_ref().map_or(c.time_ms, |p| p.registered_ms),
        load: previous.as_ref().and_then(|p| p.load.clone()),
    };
    put(txn, NODES_TABLE, &node_key(c.id), &record)?;
    Ok(Done {})
}

pub(crate) fn node_heartbeat(txn: &Tx<'_>, c: &NodeHeartbeat) -> Applied<Done> {
    let mut node = get_node(txn, c.id)?;
    node.up = true;
    // Heartbeats may arrive out of order through forwarding; time only
    // grows, and an older beat's load does not replace a newer one.
    if c.load.is_some() && c.time_ms >= node.last_heartbeat_ms {
        node.load = c.load.clone();
    }
    node.last_heartbeat_ms = node.last_heartbeat_ms.max(c.time_ms);
    put(txn, NODES_TABLE, &node_key(c.id), &node)?;
    Ok(Done {})
}

pub(crate) fn mark_node_down(txn: &Tx<'_>, c: &MarkNodeDown) -> Applied<Done> {
    let mut node = get_node(txn, c.id)?;
    node.up = false;
    put(txn, NODES_TABLE, &node_key(c.id), &node)?;
    Ok(Done {})
}
