"""Run by the tritonclient test in a virtualenv of its own (tritonclient pins an older protobuf
than edgeward's): a stock ``tritonclient.grpc`` client against one node, printing what it saw as
JSON. It only uses what a generic client has: the repository index, each model's metadata, and
inputs built from that metadata.

    python tritonclient_probe.py HOST:PORT PIPELINE
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def inputs_of(meta: dict) -> list:
    inputs = []
    for tensor in meta["inputs"]:
        shape = [max(1, int(d)) for d in tensor["shape"]]
        given = grpcclient.InferInput(tensor["name"], shape, tensor["datatype"])
        given.set_data_from_numpy(np.zeros(shape, triton_to_np_dtype(tensor["datatype"])))
        inputs.append(given)
    return inputs


def main(endpoint: str, pipeline: str) -> dict:
    client = grpcclient.InferenceServerClient(endpoint)
    seen: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(as_json=True),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "models": {},
    }
    for entry in client.get_model_repository_index(as_json=True).get("models", []):
        name, version = entry["name"], entry.get("version", "")
        meta = client.get_model_metadata(name, version, as_json=True)
        result = client.infer(
            name, inputs_of(meta), model_version=version, parameters={"source": "tritonclient", "weight": 0.5}
        )
        seen["models"][name] = {
            "version": version,
            "state": entry.get("state", ""),
            "ready": client.is_model_ready(name, version),
            "metadata": meta,
            "outputs": {o["name"]: result.as_numpy(o["name"]).tolist() for o in meta["outputs"]},
            "parameters": result.get_response(as_json=True).get("parameters", {}),
        }
    # A float parameter reaches the node as double_param (it used to be dropped on the way):
    # stage 9.0 names no stage of the pipeline and must be refused, not read as the default 1.
    meta = client.get_model_metadata(pipeline, as_json=True)
    try:
        client.infer(pipeline, inputs_of(meta), parameters={"stage": 9.0})
        seen["double_stage"] = "accepted"
    except InferenceServerException as err:
        seen["double_stage"] = {"status": err.status(), "message": err.message()}
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
