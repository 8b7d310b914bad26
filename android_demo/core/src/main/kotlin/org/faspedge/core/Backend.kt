package org.faspedge.core

/** The ONNX KV cache the app's OnnxEngine feeds back: `[1, kv_heads, positions, head_dim]` per layer, per kind. */
const val ONNX_KV_LAYOUT = "BNSH"

/** The runtimes the app carries: ExecuTorch's LlmModule for `.pte`, ONNX Runtime for `.onnx`. */
enum class Backend(val format: String, val label: String) {
    PTE("pte", "ExecuTorch (XNNPACK)"),
    ONNX("onnx", "ONNX Runtime");

    /** Quantizations of this format the app runs (fasp-edge export --quant). */
    val quantizations: Set<String>
        get() = if (this == PTE) setOf("none", "8da4w") else setOf("none", "int8", "4bit")

    /** KV-cache layouts of this format's artifacts the app's engine feeds back (null: the format has none recorded). */
    val kvLayouts: Set<String?>
        get() = if (this == PTE) setOf(null) else setOf(null, ONNX_KV_LAYOUT)

    companion object {
        fun of(name: String): Backend = entries.firstOrNull { it.format == name.lowercase() }
            ?: throw BundleException("unknown backend '$name'; choose pte or onnx")
    }
}

/**
 * What the app will run a bundle with, and the tokenizer file that goes with it. [dataFile]: the `.ptd` an
 * ExecuTorch program keeps its weights in (every fasp-edge .pte bundle), passed to LlmModule with the `.pte`.
 */
data class Plan(val backend: Backend, val modelFile: String, val tokenizerFile: String, val dataFile: String? = null)

object Backends {
    /** Every backend that can run [bundle], best first (`.pte` first: LlmModule runs the whole loop natively). */
    fun usable(bundle: Bundle): List<Plan> {
        val m = bundle.manifest
        val out = ArrayList<Plan>()
        for (b in Backend.entries) {
            val art = m.artifacts[b.format] ?: continue
            if (m.quantization !in b.quantizations) continue
            if (art.kvCache !in b.kvLayouts) continue
            val tok = when (b) {
                Backend.PTE -> m.tokenizer.runnerTokenizer  // what ExecuTorch's C++ tokenizers read
                Backend.ONNX -> m.tokenizer.hfTokenizer      // tokenizer.json, read by Tokenizer.kt
            } ?: continue
            if (!bundle.file(tok).isFile) continue
            val data = if (b == Backend.PTE) art.externalData.firstOrNull { it.endsWith(".ptd") } else null
            out.add(Plan(b, art.file, tok, data))
        }
        return out
    }

    /** The plan for [bundle]: [preferred] when it can run it, else the best usable one. */
    fun choose(bundle: Bundle, preferred: Backend? = null): Plan {
        val m = bundle.manifest
        val plans = usable(bundle)
        if (preferred != null) {
            plans.firstOrNull { it.backend == preferred }?.let { return it }
        }
        plans.firstOrNull()?.let { return it }
        // say why nothing fits
        val reasons = Backend.entries.mapNotNull { b ->
            val art = m.artifacts[b.format] ?: return@mapNotNull null
            when {
                m.quantization !in b.quantizations ->
                    "${art.file}: quantization '${m.quantization}' is not one the app runs on ${b.label} (${b.quantizations.joinToString()})"
                art.kvCache !in b.kvLayouts ->
                    "${art.file}: KV-cache layout '${art.kvCache}' is not the one the app feeds back ($ONNX_KV_LAYOUT); " +
                        "export the bundle with this fasp-edge version"
                b == Backend.PTE && m.tokenizer.runnerTokenizer == null ->
                    "${art.file}: the bundle names no tokenizer file ExecuTorch's runner can read"
                b == Backend.ONNX && m.tokenizer.hfTokenizer == null -> "${art.file}: the bundle names no tokenizer.json"
                else -> "${art.file}: the tokenizer file ${if (b == Backend.PTE) m.tokenizer.runnerTokenizer else m.tokenizer.hfTokenizer} is missing"
            }
        }
        if (reasons.isEmpty()) {
            throw BundleException("${bundle.dir.name} has no model.pte or model.onnx; export one with `fasp-edge export --formats pte,onnx`")
        }
        throw BundleException("${bundle.dir.name} cannot run here: " + reasons.joinToString("; "))
    }
}
