//! Request metrics: every rpc counted by service, method and status code,
//! and timed, whatever answered it (a service, the auth layer, the load
//! shedder, or tonic itself for an unknown method).
//!
//! # Guarantees
//! - The code is the one the client sees: from the response headers for a
//!   trailers-only answer (every refusal and error), else from the trailers
//!   at the end of the body. A response dropped before its trailers (the
//!   client went away) counts as `CANCELLED`.
//! - The duration runs from the request's arrival to its last frame, so a
//!   streaming answer is timed whole.
//! - Labels are bounded: a path that names no rpc of the served services is
//!   counted as service and method `unknown`, so a client cannot grow the
//!   series by inventing paths.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Frame, SizeHint};
use prost::Message as _;
use tonic::Code;

/// Counter: rpcs answered, by `service`, `method` and `code`.
pub const REQUESTS: &str = "waymark_grpc_requests_total";
/// Histogram: seconds from an rpc's arrival to its last frame, by
/// `service`, `method` and `code`.
pub const REQUEST_DURATION: &str = "waymark_grpc_request_duration_seconds";

/// Registers the metrics' descriptions with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        metrics::Unit::Count,
        "gRPC requests answered, by service, method and status code"
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "gRPC request duration from arrival to the last response frame"
    );
    metrics::describe_counter!(
        crate::admission::SHED,
        metrics::Unit::Count,
        "gRPC requests refused because the server was at its limit"
    );
    metrics::describe_counter!(
        crate::auth::REFUSED,
        metrics::Unit::Count,
        "gRPC requests refused by authentication or authorization, by code"
    );
}

/// The rpcs whose paths are labelled as themselves (`/service/method`).
#[derive(Debug, Clone)]
pub struct KnownMethods(Arc<HashSet<String>>);

impl KnownMethods {
    /// Every method of every service in the encoded descriptor sets.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Self {
        let mut known = HashSet::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    let full = if package.is_empty() {
                        name
                    } else {
                        format!("{package}.{name}")
                    };
                    for method in service.method {
                        known.insert(format!("/{full}/{}", method.name.unwrap_or_default()));
                    }
                }
            }
        }
        Self(Arc::new(known))
    }

    /// The `(service, method)` labels of `path`.
    fn labels(&self, path: &str) -> (String, String) {
        if self.0.contains(path) {
            if let Some((service, method)) = path.trim_start_matches('/').rsplit_once('/') {
                return (service.to_owned(), method.to_owned());
            }
        }
        ("unknown".to_owned(), "unknown".to_owned())
    }
}

/// The layer that observes every request.
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    known: KnownMethods,
}

impl ObserveLayer {
    /// Labels the rpcs of `known` by name, any other path as `unknown`.
    pub fn new(known: KnownMethods) -> Self {
        Self { known }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            known: self.known.clone(),
        }
    }
}

/// The service of [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    known: KnownMethods,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = self.known.labels(request.uri().path());
        let mut call = Call {
            service,
            method,
            started: Instant::now(),
            done: false,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            // A trailers-only answer carries its code in the headers.
            if let Some(code) = header_code(response.headers()) {
                call.finish(code);
                return Ok(response);
            }
            Ok(response.map(|body| tonic::body::Body::new(Observed { inner: body, call })))
        })
    }
}

fn header_code(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// One rpc being answered; records itself once.
struct Call {
    service: String,
    method: String,
    started: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let code = code_label(code);
        let labels = [
            ("service", self.service.clone()),
            ("method", self.method.clone()),
            ("code", code.to_owned()),
        ];
        metrics::counter!(REQUESTS, &labels).increment(1);
        metrics::histogram!(REQUEST_DURATION, &labels).record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// The canonical upper-case name of a code (`OK`, `NOT_FOUND`, …), as
/// gRPC's own metrics spell it.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A response body that records its rpc when the trailers pass.
struct Observed {
    inner: tonic::body::Body,
    call: Call,
}

impl http_body::Body for Observed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(header_code) {
                    this.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => this.call.finish(status.code()),
            // The end without trailers: the server sent no status.
            Poll::Ready(None) => this.call.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::BodyExt;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// Answers `/ok/...` with a body and OK trailers, anything else with a
    /// trailers-only NOT_FOUND.
    #[derive(Clone)]
    struct Fake;

    impl tower::Service<http::Request<()>> for Fake {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<()>) -> Self::Future {
            let ok = request.uri().path().ends_with("/GetPerson");
            Box::pin(async move {
                if !ok {
                    return Ok(tonic::Status::not_found("no such person").into_http());
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let body = http_body_util::StreamBody::new(tokio_stream::iter([
                    Ok::<_, tonic::Status>(Frame::data(bytes::Bytes::from_static(b"x"))),
                    Ok(Frame::trailers(trailers)),
                ]));
                Ok(http::Response::new(tonic::body::Body::new(body)))
            })
        }
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder()
            .uri(path)
            .body(())
            .expect("a valid request")
    }

    #[test]
    fn codes_come_from_headers_or_trailers_and_unknown_paths_are_one_series() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let known =
                    KnownMethods::from_descriptor_sets(&[waymark_proto::FILE_DESCRIPTOR_SET]);
                let mut service = ObserveLayer::new(known).layer(Fake);
                for path in [
                    "/waymark.v1.Query/GetPerson",
                    "/waymark.v1.Query/GetJourney",
                    "/made.up/Path1",
                    "/made.up/Path2",
                ] {
                    let response = service
                        .ready()
                        .await
                        .expect("ready")
                        .call(request(path))
                        .await
                        .expect("answered");
                    response.into_body().collect().await.expect("a body");
                }
                // A streamed answer dropped before its trailers.
                let response = service
                    .ready()
                    .await
                    .expect("ready")
                    .call(request("/waymark.v1.Query/GetPerson"))
                    .await
                    .expect("answered");
                drop(response);
            });
        });
        let mut counts = std::collections::BTreeMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            if key.key().name() != REQUESTS {
                continue;
            }
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            if let DebugValue::Counter(n) = value {
                counts.insert(labels.join(","), n);
            }
        }
        let want: std::collections::BTreeMap<String, u64> = [
            ("service=waymark.v1.Query,method=GetPerson,code=OK", 1),
            (
                "service=waymark.v1.Query,method=GetPerson,code=CANCELLED",
                1,
            ),
            (
                "service=waymark.v1.Query,method=GetJourney,code=NOT_FOUND",
                1,
            ),
            ("service=unknown,method=unknown,code=NOT_FOUND", 2),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(counts, want);
    }
}
