"""The OpenAPI 3.1 description of vblk's HTTP interface, served at ``/openapi.json``.

Service layer, REST front end. Kept beside the handlers in :mod:`service.http.api`; a test
checks that every route the application serves is described here and nothing more.
"""

from __future__ import annotations

from typing import Any

from service.http.errors import ErrorCode
from service.http.params import MAX_INT, MAX_SECTORS

_ERROR = {"$ref": "#/components/responses/Error"}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_BITMAP = {"name": "bitmap", "in": "path", "required": True, "schema": {"type": "string"}}
_FLUSH = {
    "name": "flush",
    "in": "query",
    "schema": {"type": "string", "enum": ["y", "n"], "default": "y"},
    "description": "Flush the disk's write cache before answering.",
}
_BYTES = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_OFFSET = {"type": "integer", "minimum": 0, "maximum": MAX_INT}
_DESCRIPTION = (
    "Sector and byte-range access to vblk's virtio-blk disks, health and metrics. "
    "Every error is JSON {error, message}: error is one of the stable codes of the Error schema. "
    "Integers in paths and queries are decimal ASCII digits (no sign, spaces, exponent or hex), "
    "at most 2^63-1; booleans are y/n (or yes/no, true/false, 1/0, on/off). The /v1 routes "
    "refuse query parameters they do not take, and a parameter given twice (400 bad_parameter). "
    "A method a route does not take is 405 method_not_allowed with an Allow header. "
    "Every JSON body ends with a newline."
)


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document() -> dict[str, Any]:
    disk_ref = {"$ref": "#/components/schemas/Disk"}
    bitmap_ref = {"$ref": "#/components/schemas/Bitmap"}
    errors = {"400": _ERROR, "403": _ERROR, "404": _ERROR, "416": _ERROR, "500": _ERROR}
    count = {
        "name": "count",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SECTORS, "default": 1},
    }
    sectors_params = [
        _NAME,
        {"name": "lba", "in": "path", "required": True, "schema": _OFFSET},
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vblk",
            "version": "1",
            "description": _DESCRIPTION,
        },
        "paths": {
            "/healthz": {
                "get": {"summary": "Liveness", "responses": {"200": _json({"type": "object"}, "alive")}}
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: every device DRIVER_OK and not NEEDS_RESET",
                    "responses": {
                        "200": _json({"type": "object"}, "ready"),
                        "503": _json({"type": "object"}, "not ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text 0.0.4, or OpenMetrics by Accept)",
                    "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI")},
                }
            },
            "/v1/disks": {
                "get": {
                    "summary": "List disks",
                    "responses": {"200": _json({"type": "array", "items": disk_ref}, "disks")},
                },
                "post": {
                    "summary": "Add a disk, live (admin): a JSON object of the keys of --disk (name "
                    'required; sizes as integers or as "64M"); its storage is opened or made, a '
                    "virtio-blk function is hot-plugged into a free PCIe slot and probed by the guest's "
                    "driver, and the disk is served on NBD and REST at once",
                    "requestBody": {"required": True, "content": {"application/json": {}}},
                    "responses": {"201": _json(disk_ref, "added"), "409": _ERROR, "503": _ERROR, **errors},
                },
            },
            "/v1/disks/{name}": {
                "parameters": [_NAME],
                "get": {
                    "summary": "Read the disk, or one byte range of it (Range: bytes=a-b, a-, -n)",
                    "parameters": [{"name": "Range", "in": "header", "schema": {"type": "string"}}],
                    "responses": {
                        "200": {"description": "the whole disk", "content": _BYTES},
                        "206": {"description": "the range asked for", "content": _BYTES},
                        **errors,
                    },
                },
                "head": {
                    "summary": "Size and range support (Content-Length, Accept-Ranges)",
                    "responses": {"200": {"description": "headers only"}, "404": _ERROR, "416": _ERROR},
                },
                "put": {
                    "summary": "Write the body at an offset (Content-Range: bytes a-b/* or ?offset=)",
                    "parameters": [
                        {"name": "Content-Range", "in": "header", "schema": {"type": "string"}},
                        {"name": "offset", "in": "query", "schema": _OFFSET},
                        _FLUSH,
                    ],
                    "requestBody": {"required": True, "content": _BYTES},
                    "responses": {"200": _json({"type": "object"}, "written"), "411": _ERROR, **errors},
                },
                "delete": {
                    "summary": "Remove a disk added at run time, live (admin): new requests are refused, "
                    "those in flight finish (within drain-timeout), the disk is flushed, its NBD "
                    "connections end (ESHUTDOWN) and its function is unplugged",
                    "responses": {
                        "200": _json(
                            {"type": "object"},
                            "{name, nbd_connections_closed, requests_abandoned, flushed, surprise_removal}",
                        ),
                        "409": _ERROR,
                        **errors,
                    },
                },
                "patch": {
                    "summary": "zero, discard or flush (data); resize or throttle (admin)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Patch"}}},
                    },
                    "responses": {"200": _json({"type": "object"}, "done"), **errors},
                },
                "options": {
                    "summary": "Allowed methods (Allow header), features and connection limits "
                    "(the shape ovirt-imageio's client reads)",
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Options"}, "what the disk does"),
                        "404": _ERROR,
                    },
                },
            },
            "/v1/disks/{name}/info": {
                "parameters": [_NAME],
                "get": {"summary": "One disk", "responses": {"200": _json(disk_ref, "disk"), "404": _ERROR}},
            },
            "/v1/disks/{name}/extents": {
                "parameters": [_NAME],
                "get": {
                    "summary": "Allocation map (imageio's zero extents) or a bitmap's dirty extents",
                    "parameters": [
                        {
                            "name": "context",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["zero", "dirty"], "default": "zero"},
                            "description": "zero: the allocation map [{start, length, zero, hole}]. "
                            "dirty: a bitmap's dirty extents [{start, length, dirty, zero}], as "
                            "ovirt-imageio serves them (404 no_dirty_tracking when the disk has no "
                            "bitmap; imageio clients read that as no incremental backup).",
                        },
                        {
                            "name": "bitmap",
                            "in": "query",
                            "schema": {"type": "string"},
                            "description": "context=dirty: the bitmap (may be left out when the disk "
                            "has exactly one usable bitmap).",
                        },
                        {"name": "offset", "in": "query", "schema": _OFFSET},
                        {
                            "name": "length",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_INT},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {"type": "array", "items": {"$ref": "#/components/schemas/Extent"}}, "map"
                        ),
                        **errors,
                    },
                },
            },
            "/v1/disks/{name}/bitmaps": {
                "parameters": [_NAME],
                "get": {
                    "summary": "The disk's dirty bitmaps, and where persistent ones are kept",
                    "responses": {"200": _json({"type": "object"}, "bitmaps"), "404": _ERROR},
                },
                "post": {
                    "summary": "Add a clean bitmap {name, granularity?, persistent?, disabled?}: it records "
                    "every write from now on (unless disabled); persistent by default where the disk "
                    "can keep it (a qcow2 image, a raw image's sidecar file)",
                    "requestBody": {"required": True, "content": {"application/json": {}}},
                    "responses": {"201": _json(bitmap_ref, "added"), "409": _ERROR, **errors},
                },
            },
            "/v1/disks/{name}/bitmaps/{bitmap}": {
                "parameters": [_NAME, _BITMAP],
                "get": {
                    "summary": "One bitmap",
                    "responses": {"200": _json(bitmap_ref, "bitmap"), "404": _ERROR},
                },
                "patch": {
                    "summary": "{op: clear | enable | disable} or {op: merge, bitmaps: [SOURCE, ...]} "
                    "(the sources OR-ed in), with the disk drained",
                    "requestBody": {"required": True, "content": {"application/json": {}}},
                    "responses": {"200": _json(bitmap_ref, "changed"), "409": _ERROR, **errors},
                },
                "delete": {
                    "summary": "Remove a bitmap (from its image too, at the next clean close)",
                    "responses": {"200": _json({"type": "object"}, "removed"), **errors},
                },
            },
            "/v1/disks/{name}/checkpoints": {
                "parameters": [_NAME],
                "post": {
                    "summary": "A checkpoint {bitmap, granularity?, persistent?}: the new bitmap starts "
                    "recording and every bitmap recording until now stops, at one instant (no write "
                    "falls between the two)",
                    "requestBody": {"required": True, "content": {"application/json": {}}},
                    "responses": {
                        "201": _json({"type": "object"}, "{bitmap, disabled}"),
                        "409": _ERROR,
                        **errors,
                    },
                },
            },
            "/v1/disks/{name}/views": {
                "parameters": [_NAME],
                "get": {
                    "summary": "The disk's point-in-time views",
                    "responses": {"200": _json({"type": "object"}, "{views: [VIEW...]}"), "404": _ERROR},
                },
                "post": {
                    "summary": "Start a point-in-time view {name, checkpoint?, bitmap?, scratch_limit?}: a "
                    "read-only disk named name, served over NBD and REST, that keeps showing this disk as it "
                    "is now (old data is copied to a scratch file before writes overwrite it); with "
                    "checkpoint, a checkpoint at the same instant (its disabled bitmap is the view's)",
                    "requestBody": {"required": True, "content": {"application/json": {}}},
                    "responses": {"201": _json({"type": "object"}, "VIEW"), "409": _ERROR, **errors},
                },
            },
            "/v1/disks/{name}/views/{view}": {
                "parameters": [
                    _NAME,
                    {"name": "view", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                "delete": {
                    "summary": "Stop a view: unexported, its device unplugged, its scratch file removed",
                    "responses": {"200": _json({"type": "object"}, "removed"), **errors},
                },
            },
            "/v1/disks/{name}/snapshot": {
                "parameters": [_NAME],
                "post": {
                    "summary": "External snapshot, live: {overlay: FILE} (a file name in the image's "
                    "directory) becomes the disk's image, a qcow2 overlay over the image it had, which "
                    "stays as it is now",
                    "requestBody": {"required": True, "content": {"application/json": {}}},
                    "responses": {
                        "201": _json({"type": "object"}, "{disk, top, base}"),
                        "409": _ERROR,
                        **errors,
                    },
                },
            },
            "/v1/disks/{name}/snapshots": {
                "parameters": [_NAME],
                "get": {
                    "summary": "The internal snapshots of a qcow2 disk's image (id, name, dates, sizes), "
                    "and the one it serves (disk key snapshot=), if any",
                    "responses": {
                        "200": _json({"type": "object"}, "{internal: [...], serving}"),
                        "404": _ERROR,
                    },
                },
            },
            "/v1/disks/{name}/commit": {
                "parameters": [_NAME],
                "post": {
                    "summary": "Commit, live: what the disk's overlay holds is copied into its base, which "
                    "becomes the disk's image again (the overlay file is left unused)",
                    "responses": {
                        "200": _json({"type": "object"}, "{disk, top, committed, copied}"),
                        "409": _ERROR,
                        **errors,
                    },
                },
            },
            "/v1/disks/{name}/sectors/{lba}": {
                "parameters": sectors_params,
                "get": {
                    "summary": "Read count sectors of 512 bytes at lba",
                    "parameters": [count],
                    "responses": {"200": {"description": "raw sectors", "content": _BYTES}, **errors},
                },
                "put": {
                    "summary": "Write whole sectors at lba (body: a multiple of 512 bytes; count, if "
                    "given, must agree with it)",
                    "parameters": [count, _FLUSH],
                    "requestBody": {"required": True, "content": _BYTES},
                    "responses": {"200": _json({"type": "object"}, "written"), "411": _ERROR, **errors},
                },
            },
            "/v1/disks/{name}/rings": {
                "parameters": [_NAME],
                "get": {
                    "summary": "Read-only snapshot of every virtqueue: descriptors, indices, chains",
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Rings"}, "the disk's rings"),
                        "404": _ERROR,
                    },
                },
            },
            "/ui": {
                "get": {
                    "summary": "Live view of the rings (a self-contained HTML page polling /ui/state.json)",
                    "responses": {"200": {"description": "the page", "content": {"text/html": {}}}},
                }
            },
            "/ui/state.json": {
                "get": {
                    "summary": "Ring snapshots of every disk, as the live view polls them",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "time": {"type": "number"},
                                    "disks": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/Rings"},
                                    },
                                },
                            },
                            "every disk",
                        )
                    },
                }
            },
        },
        "components": {
            "responses": {
                "Error": _json({"$ref": "#/components/schemas/Error"}, "error"),
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "additionalProperties": False,
                    "properties": {
                        "error": {
                            "type": "string",
                            "enum": [code.code for code in ErrorCode],
                            "description": "; ".join(
                                f"{code.code} ({code.status}): {code.description}" for code in ErrorCode
                            ),
                        },
                        "message": {"type": "string", "description": "a sentence for people"},
                    },
                },
                "Options": {
                    "type": "object",
                    "required": ["features", "max_request", "max_readers", "max_writers"],
                    "properties": {
                        "features": {
                            "type": "array",
                            "items": {
                                "type": "string",
                                "enum": ["extents", "sectors", "zero", "discard", "flush"],
                            },
                        },
                        "max_request": {"type": "integer", "description": "bytes per /sectors request"},
                        "max_readers": {
                            "type": "integer",
                            "description": "connections a client may read the disk with at once",
                        },
                        "max_writers": {
                            "type": "integer",
                            "description": "connections a client may write the disk with at once",
                        },
                        "unix_socket": {
                            "type": "string",
                            "description": "for a client on this machine, when vblk also serves "
                            "plain HTTP on a unix socket: its path",
                        },
                    },
                },
                "Disk": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "size": {"type": "integer"},
                        "sector_size": {"type": "integer"},
                        "block_size": {"type": "integer"},
                        "read_only": {"type": "boolean"},
                        "features": {"type": "array", "items": {"type": "string"}},
                        "serial": {"type": "string"},
                        "pci": {"type": "string"},
                        "queues": {"type": "integer"},
                        "queue_size": {"type": "integer"},
                        "ring": {
                            "type": "string",
                            "enum": ["split", "packed"],
                            "description": "virtqueue layout",
                        },
                        "backend": {"type": "string"},
                        "ready": {"type": "boolean"},
                        "stack": {
                            "type": "array",
                            "description": "the disk's block stack, top first: {node, ...} per node "
                            "(faults: its plan; qcow2: path, version, cluster_size, size, backing chain; "
                            "file: path; rbd: image, cache; memory: size)",
                            "items": {"type": "object", "properties": {"node": {"type": "string"}}},
                        },
                    },
                },
                "Extent": {
                    "type": "object",
                    "properties": {
                        "start": {"type": "integer"},
                        "length": {"type": "integer"},
                        "zero": {"type": "boolean"},
                        "hole": {"type": "boolean"},
                    },
                },
                "Bitmap": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "granularity": {"type": "integer", "description": "bytes of disk one bit covers"},
                        "recording": {"type": "boolean"},
                        "persistent": {"type": "boolean"},
                        "inconsistent": {
                            "type": "boolean",
                            "description": "in use when its image was last closed: may miss writes, "
                            "can only be removed",
                        },
                        "dirty_bytes": {"type": "integer"},
                        "size": {"type": "integer"},
                    },
                },
                "Rings": {
                    "type": "object",
                    "description": "One disk's virtqueues seen from the driver, the device and ring memory.",
                    "properties": {
                        "name": {"type": "string"},
                        "time": {"type": "number", "description": "Unix time of the snapshot"},
                        "pci": {"type": "string"},
                        "ready": {"type": "boolean"},
                        "requests": {
                            "type": "object",
                            "description": "completed, errors, in_flight, by_op (counters since start)",
                        },
                        "bytes": {"type": "object", "description": "read, written"},
                        "latency": {
                            "type": "object",
                            "description": "virtio latency histogram: count, sum, cumulative [le, n] buckets",
                        },
                        "resets": {"type": "integer"},
                        "resubmitted": {
                            "type": "integer",
                            "description": "requests submitted again after a recovery reset them",
                        },
                        "queues": {"type": "array", "items": {"$ref": "#/components/schemas/Queue"}},
                    },
                },
                "Queue": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "ring": {
                            "type": "string",
                            "enum": ["split", "packed"],
                            "description": "packed: avail and used hold the Driver and Device Event "
                            "Suppression areas and each side's position (wrap counter in bit 15)",
                        },
                        "size": {"type": "integer"},
                        "vector": {"type": ["integer", "null"]},
                        "event_idx": {"type": "boolean"},
                        "indirect": {"type": "boolean"},
                        "avail": {
                            "type": "object",
                            "description": "ring memory: flags, idx, used_event, recent [{idx, slot, head}]",
                        },
                        "used": {
                            "type": "object",
                            "description": "ring memory: flags, idx, avail_event, "
                            "recent [{idx, slot, id, len}]",
                        },
                        "driver": {
                            "type": "object",
                            "description": "avail_idx, last_used_idx, num_free, free_head, in_flight, kicks, "
                            "kicks_suppressed, interrupts, completed",
                        },
                        "device": {
                            "type": "object",
                            "description": "last_avail_idx, used_idx, in_flight, interrupts, "
                            "interrupts_suppressed",
                        },
                        "descriptors": {
                            "type": "string",
                            "description": "one character per descriptor: '.' free, 'h' head of a chain in "
                            "flight, 'i' head pointing at an indirect table, 'c' later in a chain",
                        },
                        "activity": {
                            "type": "object",
                            "description": "cumulative counters (two snapshots' difference is what happened "
                            "between them): chains_by_head, chains_published and chains_used (avail.idx and "
                            "used.idx unwrapped), indirect_chains, kick_batches, device_batches and "
                            "interrupt_batches ({sizes, batches}), peak_in_flight (since the last snapshot)",
                        },
                        "counts": {"type": "object", "description": "free, in_flight, chained, indirect"},
                        "chains": {
                            "type": "array",
                            "description": "chains in flight (at most 64): head, stage (avail: not yet "
                            "popped, device: being served, used: returned, not yet reaped), request "
                            "{type, op, sector, bytes, status}, descriptors [{index, addr, len, flags, "
                            "next, role: header|data|status}]",
                            "items": {"type": "object"},
                        },
                    },
                },
                "Patch": {
                    "description": "{op: flush} alone, {op: zero|discard, offset, size, flush}, "
                    '{op: resize, size, shrink} (size in bytes or as "64M"; smaller only with shrink: '
                    "true; NBD clients connected before keep the size they were told), or {op: throttle} "
                    "with QEMU's limit names (iops-total, bps-read, ..., group); other keys and "
                    "duplicate keys are refused (400 bad_field, bad_json)",
                    "type": "object",
                    "required": ["op"],
                    "properties": {
                        "op": {"type": "string", "enum": ["zero", "discard", "flush", "resize", "throttle"]},
                        "offset": _OFFSET,
                        "size": {
                            "oneOf": [
                                {"type": "integer", "minimum": 1, "maximum": MAX_INT},
                                {"type": "string"},
                            ]
                        },
                        "flush": {"type": "boolean", "default": False},
                        "shrink": {"type": "boolean", "default": False},
                    },
                },
            },
        },
    }
