/*
 * Empty stand-in for <curl/curl.h>, used only while building librdkafka.
 *
 * librdkafka 2.12.1 (vendored by rdkafka-sys 4.10) includes <curl/curl.h> in
 * rdkafka_conf.c under `#ifdef WITH_OAUTHBEARER_OIDC`, but its CMake build
 * always defines that macro (to 0 when curl is disabled, via
 * `#cmakedefine01`), so the include happens even with WITH_CURL=0. Nothing
 * from the header is used in that configuration. Waymark builds librdkafka
 * without curl (no OIDC token fetching), so this file lets it build on a
 * machine without libcurl's development headers. `.cargo/config.toml` puts
 * this folder on the C include path (CPATH) for build scripts.
 */
#ifndef WAYMARK_CURL_STUB_H
#define WAYMARK_CURL_STUB_H
#endif
