"""A client of Stoker's public gRPC API generated from the .proto files.

Usage: submit_and_wait.py GENERATED_DIR ADDR TOKEN MODULE.wasm INPUT

Uploads the module (a client stream), submits a task, waits for it to
finish (polling GetTask) and prints one JSON line: the task's id, state and
result. Exits 0 only when the task succeeded; an RPC error is printed with
its status code and exits 2.
"""

import json
import sys
import time


def main():
    gen, addr, token, module_path, task_input = sys.argv[1:6]
    sys.path.insert(0, gen)
    import grpc
    import stoker_pb2
    import stoker_pb2_grpc

    metadata = [("authorization", "Bearer " + token)]
    with grpc.insecure_channel(
        addr,
        options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ],
    ) as channel:
        api = stoker_pb2_grpc.StokerStub(channel)
        try:
            with open(module_path, "rb") as f:
                data = f.read()
            chunk = 1 << 20
            parts = [data[i : i + chunk] for i in range(0, len(data), chunk)]

            def messages():
                for i, part in enumerate(parts):
                    if i == 0:
                        yield stoker_pb2.UploadModuleRequest(name="py-module", data=part)
                    else:
                        yield stoker_pb2.UploadModuleRequest(data=part)

            uploaded = api.UploadModule(messages(), metadata=metadata, timeout=60)
            submitted = api.SubmitTask(
                stoker_pb2.SubmitTaskRequest(
                    module=uploaded.module.hash,
                    input=task_input.encode(),
                    concurrency=2,
                ),
                metadata=metadata,
                timeout=30,
            )
            deadline = time.time() + 120
            while True:
                got = api.GetTask(
                    stoker_pb2.GetTaskRequest(id=submitted.id), metadata=metadata, timeout=30
                )
                if got.task.state in ("succeed", "failed", "reverted"):
                    break
                if time.time() > deadline:
                    print(json.dumps({"error": "timeout", "state": got.task.state}))
                    return 1
                time.sleep(0.1)
        except grpc.RpcError as e:
            print(json.dumps({"code": e.code().name, "message": e.details()}))
            return 2
        print(
            json.dumps(
                {
                    "id": submitted.id,
                    "tenant": got.task.tenant,
                    "state": got.task.state,
                    "result": got.task.result.decode("utf-8", "replace"),
                }
            )
        )
        return 0 if got.task.state == "succeed" else 1


if __name__ == "__main__":
    sys.exit(main())
