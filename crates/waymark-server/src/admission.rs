//! Load shedding: a limit on the requests the whole server handles at once.
//!
//! Every connection already has its own limit
//! ([`crate::MAX_CONCURRENT_REQUESTS_PER_CONNECTION`]); this one is shared
//! by all connections, so many clients together cannot queue unbounded
//! work either. A request that finds every permit taken is answered at once
//! with `RESOURCE_EXHAUSTED` (the client backs off and retries) instead of
//! waiting behind the others, so latency stays bounded and memory with it.
//! Health checks are exempt: an overloaded server is still alive, and
//! answers its probes.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::Status;

/// Requests the server handles at once by default.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1024;

/// Metric: requests refused because the server was at its limit.
pub const SHED: &str = "waymark_grpc_requests_shed_total";

/// The path prefix of the health service, exempt from the limit.
const HEALTH: &str = "/grpc.health.v1.Health/";

/// The layer: `max` requests at once across every connection.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    max: usize,
}

impl AdmissionLayer {
    /// At most `max` requests at once (at least 1).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            permits: self.permits.clone(),
            max: self.max,
        }
    }
}

/// The service of [`AdmissionLayer`].
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max: usize,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Admission<S>
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
        if request.uri().path().starts_with(HEALTH) {
            return Box::pin(self.inner.call(request));
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let answer = self.inner.call(request);
                Box::pin(async move {
                    let response = answer.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                metrics::counter!(SHED).increment(1);
                let status = Status::resource_exhausted(format!(
                    "the server is handling its limit of {} requests at once; retry with backoff",
                    self.max
                ));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::sync::Notify;
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// Answers OK once `release` is notified.
    #[derive(Clone)]
    struct Slow {
        release: Arc<Notify>,
    }

    impl tower::Service<http::Request<()>> for Slow {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let release = self.release.clone();
            Box::pin(async move {
                release.notified().await;
                Ok(Status::ok("").into_http())
            })
        }
    }

    fn status(response: &http::Response<tonic::body::Body>) -> tonic::Code {
        Status::from_header_map(response.headers()).map_or(tonic::Code::Ok, |s| s.code())
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn requests_over_the_limit_are_shed_at_once_and_health_is_exempt() {
        let release = Arc::new(Notify::new());
        let layer = AdmissionLayer::new(2);
        let mut a = layer.layer(Slow {
            release: release.clone(),
        });
        // Another connection shares the permits.
        let mut b = layer.layer(Slow {
            release: release.clone(),
        });
        let first = tokio::spawn(
            a.ready()
                .await
                .unwrap()
                .call(request("/waymark.v1.Query/GetPerson")),
        );
        let second = tokio::spawn(
            b.ready()
                .await
                .unwrap()
                .call(request("/waymark.v1.Query/GetPerson")),
        );
        tokio::task::yield_now().await;
        let shed = a
            .ready()
            .await
            .unwrap()
            .call(request("/waymark.v1.Ingest/Publish"))
            .await
            .unwrap();
        assert_eq!(status(&shed), tonic::Code::ResourceExhausted);
        // A health check still runs.
        let health = tokio::spawn(
            b.ready()
                .await
                .unwrap()
                .call(request("/grpc.health.v1.Health/Check")),
        );
        tokio::task::yield_now().await;
        release.notify_waiters();
        for answer in [first, second, health] {
            let response = answer.await.unwrap().unwrap();
            assert_eq!(status(&response), tonic::Code::Ok);
        }
        // Permits are back.
        let again = tokio::spawn(
            a.ready()
                .await
                .unwrap()
                .call(request("/waymark.v1.Query/GetPerson")),
        );
        tokio::task::yield_now().await;
        release.notify_waiters();
        assert_eq!(status(&again.await.unwrap().unwrap()), tonic::Code::Ok);
    }
}
