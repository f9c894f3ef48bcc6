#!/usr/bin/env python3
"""Puts fake-gcs-server behind the one GCS XML-API request it does not implement.

keycast's GCS client (the Rust `object_store` crate) speaks GCS's XML API: it uploads with
`PUT /<bucket>/<object>` and expresses create-only and compare-and-swap as the
`x-goog-if-generation-match` header. fake-gcs-server (1.54, the build on PyPI, and its
newest source alike) serves the XML API's GET, HEAD, list and DELETE but answers that PUT
with 400 "invalid uploadType". This shim forwards every request unchanged except that
upload, which it rewrites into the JSON API's equivalent, a multipart upload
(`POST /upload/storage/v1/b/<bucket>/o?uploadType=multipart&name=<object>`) carrying
the same precondition as `ifGenerationMatch` and the `x-goog-meta-*` headers as metadata,
and answers it the way the XML API does (`x-goog-generation`, `ETag`; 412 when the
precondition fails). Whether a precondition holds is decided by fake-gcs-server, never
here: the shim keeps no state.

    gcs_xml_upload_shim.py LISTEN_PORT UPSTREAM_PORT     # both on 127.0.0.1
"""

import http.client
import http.server
import json
import sys
import urllib.parse
import uuid

UPSTREAM = ("127.0.0.1", 0)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}


def upstream(method, target, headers, body):
    conn = http.client.HTTPConnection(*UPSTREAM, timeout=30)
    try:
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


class Shim(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: the test output is the place for errors
        pass

    def body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raise ValueError("chunked request bodies are not supported by the shim")
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status, headers, body):
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def forward(self):
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = "%s:%d" % UPSTREAM
        body = self.body() if self.command in ("PUT", "POST", "PATCH", "DELETE") else None
        self.reply(*upstream(self.command, self.path, headers, body))

    def xml_upload(self, bucket, name):
        data = self.body()
        content_type = self.headers.get("Content-Type", "application/octet-stream")
        metadata = {
            k[len("x-goog-meta-"):]: v for k, v in self.headers.items() if k.lower().startswith("x-goog-meta-")
        }
        resource = json.dumps({"name": name, "contentType": content_type, "metadata": metadata}).encode()
        boundary = uuid.uuid4().hex
        body = b"".join([
            b"--%s\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n" % boundary.encode(), resource,
            b"\r\n--%s\r\nContent-Type: %s\r\n\r\n" % (boundary.encode(), content_type.encode()), data,
            b"\r\n--%s--\r\n" % boundary.encode(),
        ])
        query = {"uploadType": "multipart", "name": name}
        match = self.headers.get("x-goog-if-generation-match")
        if match is not None:
            query["ifGenerationMatch"] = match
        target = "/upload/storage/v1/b/%s/o?%s" % (urllib.parse.quote(bucket, safe=""), urllib.parse.urlencode(query))
        headers = {"Content-Type": "multipart/related; boundary=%s" % boundary, "Host": "%s:%d" % UPSTREAM}
        status, _, answer = upstream("POST", target, headers, body)
        if status == 200:
            obj = json.loads(answer)
            headers = [("x-goog-generation", str(obj["generation"])), ("ETag", '"%s"' % obj["etag"])]
            self.reply(200, headers, b"")
        elif status == 412:
            error = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>PreconditionFailed</Code></Error>"
            self.reply(412, [("Content-Type", "application/xml")], error)
        else:
            self.reply(status, [("Content-Type", "application/json")], answer)

    def do_PUT(self):
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.lstrip("/").split("/", 1)
        is_upload = not url.query and len(parts) == 2 and parts[1] and "x-goog-copy-source" not in self.headers
        if is_upload:
            self.xml_upload(urllib.parse.unquote(parts[0]), urllib.parse.unquote(parts[1]))
        else:
            self.forward()

    do_GET = do_HEAD = do_POST = do_DELETE = do_PATCH = forward


def main():
    global UPSTREAM
    listen, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    UPSTREAM = ("127.0.0.1", upstream_port)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", listen), Shim)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
