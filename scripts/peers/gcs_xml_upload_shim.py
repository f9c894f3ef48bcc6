#!/usr/bin/env python3
"""Puts fake-gcs-server behind the GCS XML-API requests it does not implement.

keycast's GCS client (the Rust `object_store` crate) speaks GCS's XML API: it uploads with
`PUT /<bucket>/<object>` and expresses create-only and compare-and-swap as the
`x-goog-if-generation-match` header. fake-gcs-server (1.54, the build on PyPI, and its
newest source alike) serves the XML API's GET, HEAD, list and DELETE but answers that PUT
with 400 "invalid uploadType". It does not implement the XML API's
multipart upload (`POST ?uploads`, `PUT ?partNumber&uploadId`, `POST ?uploadId`) or its
server-side copy (`PUT` with `x-goog-copy-source`) either; keycast uses both for objects
larger than a part (a create-only copy from a staging key). This shim forwards every other
request unchanged and rewrites those into the JSON API's equivalents: an upload into a
JSON-API multipart upload (`POST /upload/storage/v1/b/<bucket>/o?uploadType=multipart`),
the completion of an XML multipart upload into one such upload of the parts concatenated,
and a copy into a read of the source and such an upload of its bytes and metadata
(fake-gcs-server's own `copyTo` ignores preconditions) — each carrying the request's
`x-goog-if-generation-match` as `ifGenerationMatch`, and
answered the way the XML API answers (`x-goog-generation`, `ETag`, the XML bodies; 412 when
the precondition fails). Whether a precondition holds is decided by fake-gcs-server, never
here; the only state the shim keeps is the parts of unfinished multipart uploads.

    gcs_xml_upload_shim.py LISTEN_PORT UPSTREAM_PORT     # both on 127.0.0.1
"""

import hashlib
import http.client
import http.server
import json
import re
import sys
import threading
import urllib.parse
import uuid

UPSTREAM = ("127.0.0.1", 0)
# Unfinished XML multipart uploads: upload id -> {part number: bytes}.
UPLOADS = {}
UPLOADS_LOCK = threading.Lock()
PRECONDITION_FAILED = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>PreconditionFailed</Code></Error>"
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

    def xml_upload(self, bucket, name, data=None, complete=None, sent=None):
        data = self.body() if data is None else data
        # A completed multipart upload takes its type and metadata from its initiation; a
        # copy from its source.
        sent = sent if sent is not None else complete if complete is not None else self.headers
        content_type = sent.get("Content-Type", "application/octet-stream")
        metadata = {k[len("x-goog-meta-"):]: v for k, v in sent.items() if k.lower().startswith("x-goog-meta-")}
        resource = json.dumps({"name": name, "contentType": content_type, "metadata": metadata}).encode()
        boundary = uuid.uuid4().hex
        body = b"".join([
            b"--%s\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n" % boundary.encode(), resource,
            b"\r\n--%s\r\nContent-Type: %s\r\n\r\n" % (boundary.encode(), content_type.encode()), data,
            b"\r\n--%s--\r\n" % boundary.encode(),
        ])
        query = {"uploadType": "multipart", "name": name}
        match = self.headers.get("x-goog-if-generation-match") or sent.get("x-goog-if-generation-match")
        if match is not None:
            query["ifGenerationMatch"] = match
        target = "/upload/storage/v1/b/%s/o?%s" % (urllib.parse.quote(bucket, safe=""), urllib.parse.urlencode(query))
        headers = {"Content-Type": "multipart/related; boundary=%s" % boundary, "Host": "%s:%d" % UPSTREAM}
        status, _, answer = upstream("POST", target, headers, body)
        if status == 200:
            obj = json.loads(answer)
            headers = [("x-goog-generation", str(obj["generation"])), ("ETag", '"%s"' % obj["etag"])]
            body = b""
            if complete is not None:
                body = (
                    "<?xml version='1.0' encoding='UTF-8'?><CompleteMultipartUploadResult><Bucket>%s</Bucket>"
                    "<Key>%s</Key><ETag>\"%s\"</ETag></CompleteMultipartUploadResult>" % (bucket, name, obj["etag"])
                ).encode()
                headers.append(("Content-Type", "application/xml"))
            self.reply(200, headers, body)
        elif status == 412:
            self.reply(412, [("Content-Type", "application/xml")], PRECONDITION_FAILED)
        else:
            self.reply(status, [("Content-Type", "application/json")], answer)

    def multipart_initiate(self, bucket, name):
        self.body()
        upload_id = uuid.uuid4().hex
        with UPLOADS_LOCK:
            UPLOADS[upload_id] = ({k: v for k, v in self.headers.items()}, {})
        body = (
            "<?xml version='1.0' encoding='UTF-8'?><InitiateMultipartUploadResult><Bucket>%s</Bucket>"
            "<Key>%s</Key><UploadId>%s</UploadId></InitiateMultipartUploadResult>" % (bucket, name, upload_id)
        ).encode()
        self.reply(200, [("Content-Type", "application/xml")], body)

    def multipart_part(self, upload_id, number):
        data = self.body()
        with UPLOADS_LOCK:
            upload = UPLOADS.get(upload_id)
            parts = upload[1] if upload is not None else None
            if parts is not None:
                parts[number] = data
        if parts is None:
            self.reply(404, [("Content-Type", "application/xml")], b"<Error><Code>NoSuchUpload</Code></Error>")
        else:
            self.reply(200, [("ETag", '"%s"' % hashlib.md5(data).hexdigest())], b"")

    def multipart_complete(self, bucket, name, upload_id):
        listed = [int(n) for n in re.findall(rb"<PartNumber>(\d+)</PartNumber>", self.body())]
        with UPLOADS_LOCK:
            upload = UPLOADS.pop(upload_id, None)
        if upload is None or any(n not in upload[1] for n in listed):
            self.reply(400, [("Content-Type", "application/xml")], b"<Error><Code>InvalidPart</Code></Error>")
            return
        initiated, parts = upload
        self.xml_upload(bucket, name, b"".join(parts[n] for n in listed), complete=initiated)

    def multipart_abort(self, upload_id):
        with UPLOADS_LOCK:
            UPLOADS.pop(upload_id, None)
        self.reply(204, [], b"")

    def xml_copy(self, bucket, name):
        # fake-gcs-server's own copy (`copyTo`, `rewriteTo`) ignores `ifGenerationMatch`
        # (tried: it overwrites), so the copy is read here and uploaded with the
        # precondition, which fake-gcs-server does decide on uploads.
        self.body()
        source_bucket, source = urllib.parse.unquote(self.headers["x-goog-copy-source"]).lstrip("/").split("/", 1)
        quote = lambda v: urllib.parse.quote(v, safe="")
        host = {"Host": "%s:%d" % UPSTREAM}
        path = "/storage/v1/b/%s/o/%s" % (quote(source_bucket), quote(source))
        status, headers, answer = upstream("GET", path, host, None)
        if status != 200:
            self.reply(status, headers, answer)
            return
        described = json.loads(answer)
        status, headers, data = upstream("GET", path + "?alt=media", host, None)
        if status != 200:
            self.reply(status, headers, data)
            return
        copied = {"Content-Type": described.get("contentType", "application/octet-stream")}
        copied.update({"x-goog-meta-" + k: v for k, v in (described.get("metadata") or {}).items()})
        match = self.headers.get("x-goog-if-generation-match")
        if match is not None:
            copied["x-goog-if-generation-match"] = match
        self.xml_upload(bucket, name, data, complete=None, sent=copied)

    def target(self):
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.lstrip("/").split("/", 1)
        if len(parts) != 2 or not parts[1]:
            return url, None, None, {}
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        return url, urllib.parse.unquote(parts[0]), urllib.parse.unquote(parts[1]), query

    def do_POST(self):
        url, bucket, name, query = self.target()
        if name is not None and "uploads" in query:
            self.multipart_initiate(bucket, name)
        elif name is not None and "uploadId" in query:
            self.multipart_complete(bucket, name, query["uploadId"][0])
        else:
            self.forward()

    def do_DELETE(self):
        url, bucket, name, query = self.target()
        if name is not None and "uploadId" in query:
            self.multipart_abort(query["uploadId"][0])
        else:
            self.forward()

    def do_PUT(self):
        url, bucket, name, query = self.target()
        if name is None:
            self.forward()
        elif "uploadId" in query and "partNumber" in query:
            self.multipart_part(query["uploadId"][0], int(query["partNumber"][0]))
        elif "x-goog-copy-source" in self.headers:
            self.xml_copy(bucket, name)
        elif not url.query:
            self.xml_upload(bucket, name)
        else:
            self.forward()

    do_GET = do_HEAD = do_PATCH = forward


def main():
    global UPSTREAM
    listen, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    UPSTREAM = ("127.0.0.1", upstream_port)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", listen), Shim)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
