//! etcd's JSON gateway: the etcd API as JSON over HTTP (`POST /v3/kv/put`, `/v3/watch`, …), as
//! etcd serves it on its client URLs for curl and clients without gRPC (docs/etcd.md, "JSON
//! gateway").
//!
//! Owns the mapping of etcd's gateway (grpc-gateway 1, as etcd 3.4 runs it) onto the gRPC
//! services of this endpoint: each path is one RPC; the request body is the request message in
//! proto3's JSON mapping (field names as in the .proto files or in lowerCamelCase, 64-bit numbers
//! as strings or numbers, bytes in base64, unknown fields ignored), the answer the response
//! message (field names as in the .proto files, 64-bit numbers as strings, fields at their
//! default left out: what etcd writes). The call is the gRPC service's own method, called in
//! process: the same checks, forwarding and errors. A token comes in the `Authorization`
//! header (as etcd's gateway takes it), or as `Grpc-Metadata-Token`.
//!
//! Streams: a server stream (`/v3/watch`, `/v3/lease/keepalive`, `/v3/election/observe`,
//! `/v3/maintenance/snapshot`) answers one JSON object per line, `{"result": …}`, and a failure
//! as a last line `{"error": {…}}`. A request stream's body is a sequence of JSON objects, read as
//! they arrive; a watch goes on after the body ends, until the client goes away (as etcd's).
//! Errors: the HTTP status grpc-gateway maps the gRPC code to, and `{"error", "code",
//! "message"}` with etcd's error text.

use std::{convert::Infallible, future::Future, sync::Arc};

use axum::{
    body::{Body, Bytes},
    extract::{rejection::BytesRejection, DefaultBodyLimit, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use futures::{stream, Stream, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tonic::{Code, Status};

use super::{
    admin::{AuthService, ClusterService, MaintenanceService},
    election::ElectionService,
    gateway::{errors, EtcdNode, Gateway},
    kv::KvService,
    lease::LeaseService,
    lock::LockService,
    proto::{
        etcdserverpb::{
            auth_server::Auth, cluster_server::Cluster, kv_server::Kv, lease_server::Lease,
            maintenance_server::Maintenance,
        },
        v3electionpb::election_server::Election,
        v3lockpb::lock_server::Lock,
    },
    watch::WatchService,
};

/// The HTTP status grpc-gateway 1 answers a gRPC code with (`runtime.HTTPStatusFromCode`, as
/// etcd 3.4's gateway answers: FAILED_PRECONDITION is 412 there, later grpc-gateways say 400).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The body of a failed call: grpc-gateway 1's `{"error", "code", "message"}`.
fn error_body(status: &Status) -> serde_json::Value {
    serde_json::json!({ "error": status.message(), "code": status.code() as i32, "message": status.message() })
}

/// A failed call's answer.
fn failed(status: &Status) -> Response {
    let body = serde_json::to_vec(&error_body(status)).unwrap_or_default();
    (http_status(status.code()), [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A successful unary call's answer.
fn answered<T: Serialize>(message: &T) -> Response {
    match serde_json::to_vec(message) {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => failed(&Status::internal(format!("cannot write the answer as JSON: {e}"))),
    }
}

/// The gRPC request for `message`, with the caller's token from the HTTP headers:
/// `Authorization` (as etcd's gateway passes it on) and any `Grpc-Metadata-NAME` as `NAME`.
fn request_of<T>(headers: &HeaderMap, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for (name, value) in headers {
        let name = name.as_str();
        let key = if name == "authorization" { Some(name) } else { name.strip_prefix("grpc-metadata-") };
        let Some(key) = key else { continue };
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_bytes()),
        ) {
            request.metadata_mut().insert(key, value);
        }
    }
    request
}

/// One request message from a whole body (an empty body is the empty message). A body over the
/// limit is etcd's "request is too large".
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Status> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Status::invalid_argument(errors::REQUEST_TOO_LARGE),
        _ => Status::invalid_argument(format!("cannot read the request: {}", rejection.body_text())),
    })?;
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { &body[..] };
    serde_json::from_slice(body).map_err(|e| Status::invalid_argument(format!("the request is not valid JSON: {e}")))
}

/// Serves a unary RPC: parses the body, calls `call`, answers its response or error.
async fn unary<Req, Resp, Fut>(
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    call: impl FnOnce(tonic::Request<Req>) -> Fut,
) -> Response
where
    Req: DeserializeOwned,
    Resp: Serialize,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let message = match parse::<Req>(body) {
        Ok(m) => m,
        Err(e) => return failed(&e),
    };
    match call(request_of(&headers, message)).await {
        Ok(response) => answered(response.get_ref()),
        Err(status) => failed(&status),
    }
}

/// A server stream's answer: one line per message (`{"result": …}`); a failure ends it with a
/// line `{"error": {…}}` (grpc-gateway 1's stream error). As grpc-gateway, the HTTP status is
/// sent with the first message: a stream that fails before any answers the failure's status.
async fn streamed<T, S>(messages: S) -> Response
where
    T: Serialize + Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    let mut messages = Box::pin(messages.peekable());
    if let Some(Err(status)) = messages.as_mut().peek().await {
        let mut line = stream_error(status);
        line.push(b'\n');
        return (http_status(status.code()), [(header::CONTENT_TYPE, "application/json")], line).into_response();
    }
    let lines = messages.scan(false, |failed, item| {
        if *failed {
            return futures::future::ready(None);
        }
        let mut line = match item {
            Ok(message) => result_line(&message),
            Err(status) => {
                *failed = true;
                stream_error(&status)
            }
        };
        line.push(b'\n');
        futures::future::ready(Some(Ok::<_, Infallible>(Bytes::from(line))))
    });
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], Body::from_stream(lines)).into_response()
}

/// `{"result": MESSAGE}` (the message's fields in its own order).
fn result_line<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = b"{\"result\":".to_vec();
    match serde_json::to_writer(&mut line, message) {
        Ok(()) => {
            line.push(b'}');
            line
        }
        Err(e) => stream_error(&Status::internal(format!("cannot write an answer as JSON: {e}"))),
    }
}

/// grpc-gateway 1's error line in a stream.
fn stream_error(status: &Status) -> Vec<u8> {
    let http = http_status(status.code());
    let error = serde_json::json!({
        "grpc_code": status.code() as i32,
        "http_code": http.as_u16(),
        "message": status.message(),
        "http_status": http.canonical_reason().unwrap_or(""),
    });
    serde_json::to_vec(&serde_json::json!({ "error": error })).unwrap_or_default()
}

/// A server stream's RPC result: its messages, or the error it failed with at once.
async fn stream_answer<T, S>(result: Result<tonic::Response<S>, Status>) -> Response
where
    T: Serialize + Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    match result {
        Ok(response) => streamed(response.into_inner()).await,
        Err(status) => failed(&status),
    }
}

/// The request messages of a request stream's body, read as they arrive: JSON objects one after
/// another (whitespace between them ignored); a body that is not such a sequence, or holds one
/// object over `limit` bytes, ends the stream with INVALID_ARGUMENT.
pub fn messages<T: DeserializeOwned + Send + 'static>(
    body: Body,
    limit: usize,
) -> impl Stream<Item = Result<T, Status>> + Send + Unpin + 'static {
    struct Reading {
        chunks: axum::body::BodyDataStream,
        buffer: Vec<u8>,
        done: bool,
    }
    let reading = Reading { chunks: body.into_data_stream(), buffer: Vec::new(), done: false };
    Box::pin(stream::unfold(reading, move |mut r| async move {
        loop {
            if r.done {
                return None;
            }
            let start = r.buffer.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(r.buffer.len());
            r.buffer.drain(..start);
            if !r.buffer.is_empty() {
                let mut values = serde_json::Deserializer::from_slice(&r.buffer).into_iter::<T>();
                match values.next() {
                    Some(Ok(message)) => {
                        let used = values.byte_offset();
                        if used > limit {
                            break;
                        }
                        r.buffer.drain(..used);
                        return Some((Ok(message), r));
                    }
                    Some(Err(e)) if !e.is_eof() => {
                        r.done = true;
                        let e = Status::invalid_argument(format!("a request in the stream is not valid JSON: {e}"));
                        return Some((Err(e), r));
                    }
                    _ => {}
                }
            }
            if r.buffer.len() > limit {
                break;
            }
            match r.chunks.next().await {
                Some(Ok(chunk)) => r.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    r.done = true;
                    return Some((Err(Status::cancelled(format!("reading the request: {e}"))), r));
                }
                None if r.buffer.is_empty() => return None,
                None => {
                    r.done = true;
                    let e = Status::invalid_argument("the request stream ends inside a JSON object");
                    return Some((Err(e), r));
                }
            }
        }
        r.done = true;
        let e = Status::invalid_argument(format!("a request in the stream is over {limit} bytes"));
        Some((Err(e), r))
    }))
}

type Gw<N> = State<Arc<Gateway<N>>>;

/// Routes `$path` to the unary RPC `$method` of `$service`.
macro_rules! unary_route {
    ($router:expr, $path:literal, $service:ident, $method:ident) => {
        $router.route(
            $path,
            post(|State(gw): Gw<N>, headers: HeaderMap, body: Result<Bytes, BytesRejection>| async move {
                unary(headers, body, |request| async move { $service(gw).$method(request).await }).await
            }),
        )
    };
}

/// Routes `$path` to the server-streaming RPC `$method` of `$service` (one request message).
macro_rules! stream_route {
    ($router:expr, $path:literal, $service:ident, $method:ident) => {
        $router.route(
            $path,
            post(|State(gw): Gw<N>, headers: HeaderMap, body: Result<Bytes, BytesRejection>| async move {
                match parse(body) {
                    Ok(message) => stream_answer($service(gw).$method(request_of(&headers, message)).await).await,
                    Err(e) => failed(&e),
                }
            }),
        )
    };
}

/// The gateway's routes, over `gw`; request messages up to `max_request_bytes` (of protobuf; the
/// JSON body may be twice that: base64 and field names).
pub fn routes<N: EtcdNode>(gw: Arc<Gateway<N>>, max_request_bytes: usize) -> Router {
    let limit = max_request_bytes.saturating_mul(2);
    let r = Router::new();
    let r = unary_route!(r, "/v3/kv/range", KvService, range);
    let r = unary_route!(r, "/v3/kv/put", KvService, put);
    let r = unary_route!(r, "/v3/kv/deleterange", KvService, delete_range);
    let r = unary_route!(r, "/v3/kv/txn", KvService, txn);
    let r = unary_route!(r, "/v3/kv/compaction", KvService, compact);
    let r = r.route(
        "/v3/watch",
        post(move |State(gw): Gw<N>, headers: HeaderMap, body: Body| async move {
            let caller = match gw.caller(request_of(&headers, ()).metadata()) {
                Ok(c) => c,
                Err(e) => return failed(&e),
            };
            // The watch goes on after the body ends (as etcd's), until the client goes away.
            let requests = messages(body, limit).chain(stream::pending());
            streamed(WatchService(gw).serve_stream(caller, requests)).await
        }),
    );
    let r = unary_route!(r, "/v3/lease/grant", LeaseService, lease_grant);
    let r = unary_route!(r, "/v3/lease/revoke", LeaseService, lease_revoke);
    let r = unary_route!(r, "/v3/kv/lease/revoke", LeaseService, lease_revoke);
    let r = r.route(
        "/v3/lease/keepalive",
        post(move |State(gw): Gw<N>, headers: HeaderMap, body: Body| async move {
            let caller = match gw
                .caller(request_of(&headers, ()).metadata())
                .and_then(|c| c.needs("lease keep-alive", |s| s.write, "write").map(|()| c))
            {
                Ok(c) => c,
                Err(e) => return failed(&e),
            };
            streamed(LeaseService(gw).keep_alive(caller, messages(body, limit))).await
        }),
    );
    let r = unary_route!(r, "/v3/lease/timetolive", LeaseService, lease_time_to_live);
    let r = unary_route!(r, "/v3/kv/lease/timetolive", LeaseService, lease_time_to_live);
    let r = unary_route!(r, "/v3/lease/leases", LeaseService, lease_leases);
    let r = unary_route!(r, "/v3/kv/lease/leases", LeaseService, lease_leases);
    let r = unary_route!(r, "/v3/cluster/member/add", ClusterService, member_add);
    let r = unary_route!(r, "/v3/cluster/member/remove", ClusterService, member_remove);
    let r = unary_route!(r, "/v3/cluster/member/update", ClusterService, member_update);
    let r = unary_route!(r, "/v3/cluster/member/list", ClusterService, member_list);
    let r = unary_route!(r, "/v3/cluster/member/promote", ClusterService, member_promote);
    let r = unary_route!(r, "/v3/maintenance/alarm", MaintenanceService, alarm);
    let r = unary_route!(r, "/v3/maintenance/status", MaintenanceService, status);
    let r = unary_route!(r, "/v3/maintenance/defragment", MaintenanceService, defragment);
    let r = unary_route!(r, "/v3/maintenance/hash", MaintenanceService, hash);
    let r = stream_route!(r, "/v3/maintenance/snapshot", MaintenanceService, snapshot);
    let r = unary_route!(r, "/v3/maintenance/transfer-leadership", MaintenanceService, move_leader);
    let r = unary_route!(r, "/v3/maintenance/downgrade", MaintenanceService, downgrade);
    let r = unary_route!(r, "/v3/auth/enable", AuthService, auth_enable);
    let r = unary_route!(r, "/v3/auth/disable", AuthService, auth_disable);
    let r = unary_route!(r, "/v3/auth/status", AuthService, auth_status);
    let r = unary_route!(r, "/v3/auth/authenticate", AuthService, authenticate);
    let r = unary_route!(r, "/v3/auth/user/add", AuthService, user_add);
    let r = unary_route!(r, "/v3/auth/user/get", AuthService, user_get);
    let r = unary_route!(r, "/v3/auth/user/list", AuthService, user_list);
    let r = unary_route!(r, "/v3/auth/user/delete", AuthService, user_delete);
    let r = unary_route!(r, "/v3/auth/user/changepw", AuthService, user_change_password);
    let r = unary_route!(r, "/v3/auth/user/grant", AuthService, user_grant_role);
    let r = unary_route!(r, "/v3/auth/user/revoke", AuthService, user_revoke_role);
    let r = unary_route!(r, "/v3/auth/role/add", AuthService, role_add);
    let r = unary_route!(r, "/v3/auth/role/get", AuthService, role_get);
    let r = unary_route!(r, "/v3/auth/role/list", AuthService, role_list);
    let r = unary_route!(r, "/v3/auth/role/delete", AuthService, role_delete);
    let r = unary_route!(r, "/v3/auth/role/grant", AuthService, role_grant_permission);
    let r = unary_route!(r, "/v3/auth/role/revoke", AuthService, role_revoke_permission);
    let r = unary_route!(r, "/v3/lock/lock", LockService, lock);
    let r = unary_route!(r, "/v3/lock/unlock", LockService, unlock);
    let r = unary_route!(r, "/v3/election/campaign", ElectionService, campaign);
    let r = unary_route!(r, "/v3/election/proclaim", ElectionService, proclaim);
    let r = unary_route!(r, "/v3/election/leader", ElectionService, leader);
    let r = stream_route!(r, "/v3/election/observe", ElectionService, observe);
    let r = unary_route!(r, "/v3/election/resign", ElectionService, resign);
    r.layer(DefaultBodyLimit::max(limit)).with_state(gw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::proto::etcdserverpb::{
        compare, request_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchRequest,
    };

    fn read<T: DeserializeOwned>(body: &[u8]) -> Result<T, Status> {
        parse(Ok(Bytes::copy_from_slice(body)))
    }

    #[test]
    fn messages_read_as_etcd_writes_them_in_both_field_spellings() {
        // etcd's documentation's own example, and the same in lowerCamelCase with numbers.
        let r: RangeRequest =
            read(br#"{"key": "Zm9v", "range_end": "Zm9w", "limit": "5", "sort_order": "DESCEND"}"#).unwrap();
        assert_eq!((r.key.as_slice(), r.range_end.as_slice(), r.limit, r.sort_order), (&b"foo"[..], &b"fop"[..], 5, 2));
        let r: RangeRequest =
            read(br#"{"key": "Zm9v", "rangeEnd": "Zm9w", "limit": 5, "sortOrder": 2, "whatever": 1}"#).unwrap();
        assert_eq!((r.range_end.as_slice(), r.limit, r.sort_order), (&b"fop"[..], 5, 2));
        let t: TxnRequest = read(
            br#"{"compare":[{"key":"Zm9v","result":"EQUAL","target":"VALUE","value":"YmFy"}],
                 "success":[{"request_put":{"key":"Zm9v","value":"YmF6"}}]}"#,
        )
        .unwrap();
        assert_eq!(t.compare[0].target_union, Some(compare::TargetUnion::Value(b"bar".to_vec())));
        assert!(matches!(&t.success[0].request, Some(request_op::Request::RequestPut(p)) if p.value == b"baz"));
        assert!(read::<PutRequest>(b"").is_ok(), "an empty body is the empty message");
        let bad = read::<PutRequest>(br#"{"key": "not base64!"}"#).unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        let _ = (Compare::default(), RequestOp::default());
    }

    #[test]
    fn answers_use_the_proto_names_and_strings_for_64_bit_numbers() {
        let header = crate::etcd::proto::etcdserverpb::ResponseHeader {
            cluster_id: 7,
            member_id: 1,
            revision: 12,
            raft_term: 3,
        };
        let v = serde_json::to_value(header).unwrap();
        assert_eq!(v, serde_json::json!({"cluster_id": "7", "member_id": "1", "revision": "12", "raft_term": "3"}));
    }

    #[tokio::test]
    async fn a_request_stream_is_read_object_by_object_as_it_arrives() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let body = Body::from_stream(tokio_stream_of(rx));
        let mut requests = messages::<WatchRequest>(body, 1024);
        tx.send(Ok(Bytes::from_static(br#" {"create_request": {"key": "YQ=="}} {"cancel_"#))).await.unwrap();
        let first = requests.next().await.unwrap().unwrap();
        assert!(first.request_union.is_some());
        tx.send(Ok(Bytes::from_static(br#"request": {"watch_id": "3"}}"#))).await.unwrap();
        let second = requests.next().await.unwrap().unwrap();
        assert!(matches!(
            second.request_union,
            Some(crate::etcd::proto::etcdserverpb::watch_request::RequestUnion::CancelRequest(c)) if c.watch_id == 3
        ));
        tx.send(Ok(Bytes::from_static(b"\n{\"progress"))).await.unwrap();
        drop(tx);
        let cut = requests.next().await.unwrap().unwrap_err();
        assert_eq!(cut.code(), Code::InvalidArgument, "{cut:?}");
        assert!(requests.next().await.is_none());

        let body = Body::from(r#"{"create_request": {"key": "YQ=="}} nonsense"#);
        let mut requests = messages::<WatchRequest>(body, 1024);
        assert!(requests.next().await.unwrap().is_ok());
        assert_eq!(requests.next().await.unwrap().unwrap_err().code(), Code::InvalidArgument);
        assert!(requests.next().await.is_none());

        let big = format!(r#"{{"create_request": {{"key": "{}"}}}}"#, "QUFB".repeat(1000));
        let mut requests = messages::<WatchRequest>(Body::from(big), 1024);
        let over = requests.next().await.unwrap();
        assert!(matches!(&over, Err(e) if e.code() == Code::InvalidArgument), "an object over the limit is refused");
        assert!(requests.next().await.is_none());
    }

    fn tokio_stream_of(
        rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
    }

    async fn body_text(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_stream_answers_json_lines_and_its_first_failure_sets_the_status() {
        let header = |revision| crate::etcd::proto::etcdserverpb::ResponseHeader { revision, ..Default::default() };
        let items =
            vec![Ok(header(1)), Ok(header(2)), Err(Status::unavailable("etcdserver: no leader")), Ok(header(3))];
        let response = streamed(stream::iter(items)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let text = body_text(response).await;
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3, "nothing after the failure: {text}");
        assert_eq!(lines[1], serde_json::json!({"result": {"revision": "2"}}));
        assert_eq!(lines[2]["error"]["grpc_code"], 14);
        assert_eq!(lines[2]["error"]["http_code"], 503);
        assert_eq!(lines[2]["error"]["message"], "etcdserver: no leader");

        let failing = vec![Err::<crate::etcd::proto::etcdserverpb::ResponseHeader, _>(Status::permission_denied("no"))];
        let response = streamed(stream::iter(failing)).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let v: serde_json::Value = serde_json::from_str(body_text(response).await.trim()).unwrap();
        assert_eq!(v["error"]["grpc_code"], 7);
    }

    #[test]
    fn grpc_codes_become_grpc_gateways_http_statuses() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::FailedPrecondition), StatusCode::PRECONDITION_FAILED);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(Code::Unimplemented), StatusCode::NOT_IMPLEMENTED);
        assert_eq!(http_status(Code::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        let body = error_body(&Status::invalid_argument("etcdserver: key is not provided"));
        assert_eq!(
            body,
            serde_json::json!({"error": "etcdserver: key is not provided", "code": 3, "message": "etcdserver: key is not provided"})
        );
    }
}
