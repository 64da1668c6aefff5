"""Numeric probe of which MLAS int8 GEMM path onnxruntime uses.
AVX2 (no VNNI) U8S8 kernel uses vpmaddubsw, which saturates adjacent u8*s8 pair sums to int16.
With A=255 and B=127 (or -128) the exact int32 result differs from the saturated one."""
import json, platform, sys, time
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper

M, K, N = 4, 64, 8
A = np.full((M, K), 255, np.uint8)
A[1] = np.arange(K) % 256            # a "benign" row
A[2, ::2] = 0                         # every other 255 -> no pair saturation
A[3] = np.random.RandomState(0).randint(0, 256, K)
B = np.zeros((K, N), np.int8)
B[:, 0] = 127
B[:, 1] = -128
B[:, 2] = np.where(np.arange(K) % 2 == 0, 127, -128)   # pairs cancel: no saturation
B[:, 3] = np.random.RandomState(1).randint(-128, 128, K)
B[:, 4] = 100; B[:, 5] = -100; B[:, 6] = 64; B[:, 7] = 1
exact = A.astype(np.int64) @ B.astype(np.int64)

def sat_reference(A, B):
    # emulate vpmaddubsw: int16-saturated sums of adjacent pairs, then int32 accumulation
    a = A.astype(np.int64); b = B.astype(np.int64)
    prod = a[:, :, None] * b[None, :, :]                 # M,K,N
    pairs = prod[:, 0::2, :] + prod[:, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(1)
sat = sat_reference(A, B)

def neon_wrap_reference(A, B):
    # MLAS aarch64 QgemmS8S8KernelNeon (used for U8S8 without dotprod; A is flipped to int8 = A-128):
    # smull(a[k]*b[k]) + smlal(a[k+8]*b[k+8]) in int16 (wraps), sadalp into int32; +128*colsum(B) fixup.
    a = A.astype(np.int64) - 128; b = B.astype(np.int64); Kp = (A.shape[1] + 15) // 16 * 16
    a = np.pad(a, ((0, 0), (0, Kp - a.shape[1]))); b = np.pad(b, ((0, Kp - b.shape[0]), (0, 0)))
    prod = a[:, :, None] * b[None, :, :]
    prod = prod.reshape(A.shape[0], Kp // 16, 2, 8, B.shape[1])
    pairs = prod[:, :, 0] + prod[:, :, 1]
    pairs = (pairs + 32768) % 65536 - 32768
    return pairs.sum((1, 2)) + 128 * b.sum(0)
neon = neon_wrap_reference(A, B)

def classify(y, ex, sa):
    y = np.asarray(y)
    if np.array_equal(y, ex): return "EXACT"
    if np.array_equal(y, sa): return "SATURATED(vpmaddubsw)"
    if np.array_equal(y, neon): return "INT16_WRAP(arm64 NEON smull/smlal)"
    return "OTHER"

so = ort.SessionOptions(); so.intra_op_num_threads = 1
res = {"python": sys.version.split()[0], "machine": platform.machine(), "ort": ort.__version__,
       "numpy": np.__version__}

# 1) MatMulInteger, B as initializer (prepacked) and B as input
for b_init in (True, False):
    inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, [M, K])]
    inits = []
    if b_init:
        inits.append(numpy_helper.from_array(B, "B"))
    else:
        inputs.append(helper.make_tensor_value_info("B", TensorProto.INT8, [K, N]))
    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g", inputs,
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, [M, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]); m.ir_version = 8
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"A": A} if b_init else {"A": A, "B": B}
    y = s.run(None, feed)[0]
    res["MatMulInteger_B_" + ("init" if b_init else "input")] = classify(y, exact, sat)
    if b_init: res["row0"] = {"ort": y[0, :3].tolist(), "exact": exact[0, :3].tolist(), "sat": sat[0, :3].tolist()}

# 1b) MatMulInteger U8U8 (uint8 weights, zero point 128 as quantize_dynamic's QUInt8 would use)
Bu = (B.astype(np.int16) + 128).astype(np.uint8)
g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "Bu", "az", "bz"], ["Y"])], "g",
                      [helper.make_tensor_value_info("A", TensorProto.UINT8, [M, K])],
                      [helper.make_tensor_value_info("Y", TensorProto.INT32, [M, N])],
                      [numpy_helper.from_array(Bu, "Bu"), numpy_helper.from_array(np.array(0, np.uint8), "az"),
                       numpy_helper.from_array(np.array(128, np.uint8), "bz")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]); m.ir_version = 8
y = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
res["MatMulInteger_U8U8"] = classify(y, exact, sat)

# 2) com.microsoft DynamicQuantizeMatMul / MatMulIntegerToFloat (fp32 in, fp32 out)
Af = A.astype(np.float32) / 255.0     # DynamicQuantizeLinear -> scale 1/255, zp 0 -> uint8 == A (row 1..3 approx)
bscale = np.array([0.01], np.float32)
for op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
    try:
        if op == "DynamicQuantizeMatMul":
            node = helper.make_node(op, ["A", "B", "bs"], ["Y"], domain="com.microsoft")
            inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(bscale, "bs")]
            inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, [M, K])]
            feed = {"A": Af}; ascale = None
        else:
            node = helper.make_node(op, ["A", "B", "as", "bs"], ["Y"], domain="com.microsoft")
            inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(bscale, "bs"),
                     numpy_helper.from_array(np.array(1 / 255.0, np.float32), "as")]
            inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, [M, K])]
            feed = {"A": A}
        g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]); m.ir_version = 8
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        y = s.run(None, feed)[0]
        # compare the whole output with the three integer models, scaled
        sc = np.float64(np.float32(1 / 255.0)) * np.float64(bscale[0])
        def close(ref): return bool(np.allclose(y, ref * sc, rtol=1e-5, atol=1e-3))
        res[op] = ("EXACT" if close(exact) else "SATURATED(vpmaddubsw)" if close(sat)
                   else "INT16_WRAP(arm64 NEON smull/smlal)" if close(neon) else "OTHER")
    except Exception as ex:
        res[op] = "ERROR " + repr(ex)[:200]

print(json.dumps(res))
