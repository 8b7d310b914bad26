package org.faspedge.core

import java.io.File
import java.security.MessageDigest

/** Bundle format versions this app reads (fasp_edge/runtime/bundle.py: BUNDLE_FORMAT_VERSION). */
const val SUPPORTED_FORMAT_VERSION = 1

/** A bundle the app cannot use, with a message to show on screen as it is. */
class BundleException(message: String) : Exception(message)

data class FileRecord(val name: String, val sha256: String, val bytes: Long)

/**
 * One model file of the bundle. [kvCache]: the ONNX graph's KV-cache layout as the manifest records it
 * (`artifacts.onnx.kv_cache.layout`; "BNSH": `[1, kv_heads, positions, head_dim]`, grown by the graph), null for
 * a `.pte` or a bundle written before the field existed (those are BNSH too).
 */
data class Artifact(val format: String, val file: String, val externalData: List<String>, val kvCache: String? = null)

/** One decoder layer's shapes (a pruned model's differ from layer to layer). */
data class LayerDims(val ffnDim: Int, val numHeads: Int, val numKvHeads: Int, val headDim: Int, val vHeadDim: Int)

data class TokenizerInfo(
    val hfTokenizer: String?,
    val runnerTokenizer: String?,
    val bosId: Int?,
    val eosIds: List<Int>,
    val addBos: Boolean,
    val chatTemplate: Boolean,
)

data class Manifest(
    val formatVersion: Int,
    val modelType: String,
    val source: String,
    val parameters: Long?,
    val pruning: String?,
    val maxContext: Int,
    val quantization: String,
    val vocabSize: Int,
    val artifacts: Map<String, Artifact>,
    val files: Map<String, FileRecord>,
    val tokenizer: TokenizerInfo,
    val layers: List<LayerDims>,
) {
    companion object {
        /** Parse manifest.json text; [where] names the file in error messages. */
        fun parse(text: String, where: String = "manifest.json"): Manifest {
            val root = try {
                JsonView(Json.parse(text))
            } catch (e: Json.ParseException) {
                throw BundleException("$where is not valid JSON (${e.message}); re-export or re-copy the bundle")
            }
            try {
                if (root["format"].stringOrNull() != "fasp-edge-bundle") {
                    throw BundleException("$where is not a fasp-edge bundle manifest; export the model with `fasp-edge export`")
                }
                val version = root["format_version"].int()
                if (version > SUPPORTED_FORMAT_VERSION) {
                    throw BundleException("the bundle has format version $version, newer than this app reads " +
                        "($SUPPORTED_FORMAT_VERSION); update the app")
                }
                val model = root["model"]
                val fasp = model["fasp"]
                val pruning = if (fasp.isNull()) null else "${fasp["method"].string()} ${fasp["sparsity"].double()}"
                val artifacts = root["artifacts"].let { a ->
                    a.keys().associateWith { fmt ->
                        val x = a[fmt]
                        Artifact(fmt, x["file"].string(),
                            if (x.has("external_data")) x["external_data"].list().map { it.string() } else emptyList(),
                            if (x.has("kv_cache")) x["kv_cache"]["layout"].string() else null)
                    }
                }
                val files = root["files"].let { f ->
                    f.keys().associateWith { n -> FileRecord(n, f[n]["sha256"].string(), f[n]["bytes"].long()) }
                }
                val t = root["tokenizer"]
                val tok = TokenizerInfo(
                    hfTokenizer = t["hf_tokenizer"].stringOrNull(),
                    runnerTokenizer = t["runner_tokenizer"].stringOrNull(),
                    bosId = if (t["bos_id"].isNull()) null else t["bos_id"].int(),
                    eosIds = t["eos_ids"].list().map { it.int() },
                    addBos = t["add_bos"].bool(),
                    chatTemplate = t["chat_template"].bool(),
                )
                return Manifest(version, model["model_type"].string(), model["source"].string(),
                    if (model["parameters"].isNull()) null else model["parameters"].long(), pruning,
                    root["max_context"].int(), root["quantization"].string(), model["vocab_size"].int(),
                    artifacts, files, tok,
                    model["layers"].list().map { l ->
                        LayerDims(l["ffn_dim"].int(), l["num_heads"].int(), l["num_kv_heads"].int(), l["head_dim"].int(),
                            l["v_head_dim"].int())
                    })
            } catch (e: Json.ParseException) {
                throw BundleException("$where: ${e.message}; re-export the bundle with `fasp-edge export`")
            }
        }
    }

    /** One line for the bundle picker. */
    fun describe(): String {
        val what = pruning?.let { "pruned ($it)" } ?: "dense"
        val params = parameters?.let { String.format("%.1fM params", it / 1e6) } ?: "? params"
        return "$modelType, $what, $params, ${artifacts.keys.joinToString("+")}, $quantization, context $maxContext"
    }
}

/** A bundle folder whose manifest was read and whose files were checked. */
class Bundle(val dir: File, val manifest: Manifest) {
    fun file(name: String) = File(dir, name)

    companion object {
        /**
         * Read [dir]/manifest.json and check every file it lists: present, the recorded size, and (with
         * [checkHashes]) the recorded sha256. Every failure is a [BundleException] whose message says what to do.
         */
        fun open(dir: File, checkHashes: Boolean = true): Bundle {
            if (!dir.isDirectory) throw BundleException("${dir.path} is not a folder; push a bundle folder made by `fasp-edge export`")
            val mf = File(dir, "manifest.json")
            if (!mf.isFile) {
                throw BundleException("${dir.name} has no manifest.json, so it is not a fasp-edge bundle; " +
                    "make one with `fasp-edge export` and push the whole folder")
            }
            val manifest = Manifest.parse(mf.readText(), "${dir.name}/manifest.json")
            for (rec in manifest.files.values) {
                val f = File(dir, rec.name)
                if (!f.isFile) throw BundleException("${dir.name}: ${rec.name} is missing; the bundle is incomplete — push it again")
                if (f.length() != rec.bytes) {
                    throw BundleException("${dir.name}: ${rec.name} has ${f.length()} bytes, the manifest says ${rec.bytes}; " +
                        "the copy is damaged — push it again")
                }
                if (checkHashes && sha256(f) != rec.sha256) {
                    throw BundleException("${dir.name}: ${rec.name} does not match its sha256 in the manifest; " +
                        "the copy is damaged — push it again")
                }
            }
            for (a in manifest.artifacts.values) {
                for (name in listOf(a.file) + a.externalData) {
                    if (name !in manifest.files) throw BundleException("${dir.name}: the manifest lists ${name} as an artifact but not as a file; re-export the bundle")
                }
            }
            return Bundle(dir, manifest)
        }

        fun sha256(f: File): String {
            val md = MessageDigest.getInstance("SHA-256")
            f.inputStream().use { input ->
                val buf = ByteArray(1 shl 20)
                while (true) {
                    val n = input.read(buf)
                    if (n < 0) break
                    md.update(buf, 0, n)
                }
            }
            return md.digest().joinToString("") { "%02x".format(it) }
        }
    }
}
