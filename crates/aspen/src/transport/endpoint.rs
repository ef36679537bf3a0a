//! The node's identity and its iroh endpoint.
//!
//! Owns `<data-dir>/node.key` (created once, mode 0600) and the offline-safe endpoint settings
//! (docs/design.md invariant 5): no relays, no DNS or pkarr address lookup, no portmapper, minimal
//! net-report, only the IP socket we bind, and an in-memory address book for dialling peers by id.
//! Nothing here ever contacts a host that was not given to it.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use iroh::{
    address_lookup::MemoryLookup,
    endpoint::{presets, AckFrequencyConfig, IdleTimeout, PortmapperConfig, QuicTransportConfig},
    Endpoint, NetReportConfig, RelayMode, SecretKey,
};

/// Errors while creating the node identity or endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("node key {path}: {source}")]
    Key { path: PathBuf, source: std::io::Error },
    #[error("node key {0} is corrupt (expected 32 bytes)")]
    KeyCorrupt(PathBuf),
    #[error("address {0} is in use (is another node running there?); choose another --bind-addr")]
    AddrInUse(SocketAddr),
    #[error("address {0} is not an address of this machine; choose another --bind-addr")]
    AddrNotAvailable(SocketAddr),
    #[error("not allowed to bind {0}; choose another --bind-addr")]
    BindDenied(SocketAddr),
    #[error("cannot bind {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
}

impl EndpointError {
    /// Whether restarting unchanged cannot help (the address or the key file is the problem).
    pub fn is_permanent(&self) -> bool {
        match self {
            EndpointError::AddrInUse(_)
            | EndpointError::AddrNotAvailable(_)
            | EndpointError::BindDenied(_)
            | EndpointError::KeyCorrupt(_) => true,
            EndpointError::Key { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
            EndpointError::Bind { .. } => false,
        }
    }
}

/// Finds out, before iroh binds, why `addr` cannot be bound (iroh's error only says "Failed to
/// bind sockets"): a plain UDP socket is bound to it and released at once.
fn probe_bind(addr: SocketAddr) -> Result<(), EndpointError> {
    match std::net::UdpSocket::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.kind() {
            std::io::ErrorKind::AddrInUse => EndpointError::AddrInUse(addr),
            std::io::ErrorKind::AddrNotAvailable => EndpointError::AddrNotAvailable(addr),
            std::io::ErrorKind::PermissionDenied => EndpointError::BindDenied(addr),
            _ => EndpointError::Bind { addr, message: e.to_string() },
        }),
    }
}

/// Loads `<data-dir>/node.key`, creating it (mode 0600) on first start.
pub fn load_or_create_key(data_dir: &Path) -> Result<SecretKey, EndpointError> {
    let path = data_dir.join("node.key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| EndpointError::KeyCorrupt(path.clone()))?;
            Ok(SecretKey::from_bytes(&arr))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate();
            write_private(&path, &key.to_bytes()).map_err(|source| EndpointError::Key { path, source })?;
            Ok(key)
        }
        Err(source) => Err(EndpointError::Key { path, source }),
    }
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes `contents` to `path` atomically (temp file + rename).
pub fn write_file_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The QUIC transport settings every Aspen endpoint uses. Keep-alives every second and a
/// 6-second idle timeout let both nodes and clients notice a dead peer quickly (a request on a
/// connection to a killed node fails instead of hanging), which drives failover.
///
/// Acknowledgements: by default a QUIC peer acknowledges every second packet at once, and in
/// Aspen's request/response traffic that ACK goes out alone — before the answer (or the next
/// request) it could have ridden on is ready: measured at one ACK-only datagram per request,
/// a third of all datagrams. Every Aspen endpoint asks its peers (QUIC ACK-frequency
/// extension) to wait for [`ACK_ELICITING_THRESHOLD`] + 1 packets or the usual maximum ACK
/// delay (25 ms) instead; packets out of order are still acknowledged at once, so loss
/// recovery is unchanged.
fn transport_config() -> QuicTransportConfig {
    let idle = IdleTimeout::try_from(std::time::Duration::from_secs(6)).ok();
    let mut acks = AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    QuicTransportConfig::builder()
        .max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into())
        .receive_window(CONNECTION_RECEIVE_WINDOW.into())
        .keep_alive_interval(std::time::Duration::from_secs(1))
        .max_idle_timeout(idle)
        .ack_frequency_config(Some(acks))
        .build()
}

/// Streams a peer may have open to this endpoint at once, per connection (more wait for credit).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Bytes a peer may have sent on one connection that this endpoint has not read yet (QUIC's
/// connection flow-control window; each stream's own window is 1.25 MB): with it, a connection
/// buffers at most this much unread data however many streams it opens.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;

/// How many ack-eliciting packets a peer may receive before it must acknowledge (see
/// [`transport_config`]).
const ACK_ELICITING_THRESHOLD: u32 = 7;

/// Binds an offline-safe endpoint on `bind_addr`. `secret_key` `None` makes an ephemeral identity
/// (clients); `alpns` lists the protocols this endpoint accepts (empty for pure clients).
pub async fn bind_endpoint(
    bind_addr: SocketAddr,
    secret_key: Option<SecretKey>,
    lookup: MemoryLookup,
) -> Result<Endpoint, EndpointError> {
    bind_endpoint_gated(bind_addr, secret_key, lookup, None).await
}

/// [`bind_endpoint`] with `gate` deciding who may connect to the members-only ALPNs (a node's
/// endpoint; see [`super::gate`]).
pub async fn bind_endpoint_gated(
    bind_addr: SocketAddr,
    secret_key: Option<SecretKey>,
    lookup: MemoryLookup,
    gate: Option<std::sync::Arc<super::gate::PeerGate>>,
) -> Result<Endpoint, EndpointError> {
    let bind_err = |message: String| EndpointError::Bind { addr: bind_addr, message };
    probe_bind(bind_addr)?;
    let mut builder = Endpoint::builder(presets::Minimal)
        .relay_mode(RelayMode::Disabled)
        .clear_address_lookup()
        .portmapper_config(PortmapperConfig::Disabled)
        .net_report_config(NetReportConfig::minimal())
        .clear_ip_transports()
        .bind_addr(bind_addr)
        .map_err(|e| bind_err(e.to_string()))?
        .address_lookup(lookup)
        .transport_config(transport_config());
    if let Some(key) = secret_key {
        builder = builder.secret_key(key);
    }
    if let Some(gate) = gate {
        builder = builder.hooks(super::gate::GateHooks(gate));
    }
    builder.bind().await.map_err(|e| bind_err(e.to_string()))
}

/// The socket addresses the endpoint actually listens on (port 0 resolved), for tickets.
pub fn listening_addrs(endpoint: &Endpoint, bind_addr: SocketAddr) -> Vec<SocketAddr> {
    let bound = endpoint.bound_sockets();
    let mut addrs: Vec<SocketAddr> = bound
        .into_iter()
        .filter(|a| a.is_ipv4() == bind_addr.is_ipv4())
        .map(|a| if a.ip().is_unspecified() { SocketAddr::new(bind_addr.ip(), a.port()) } else { a })
        .collect();
    if addrs.is_empty() {
        addrs.push(bind_addr);
    }
    addrs
}
