package org.faspedge.core

import java.io.File

/**
 * Turns what the user typed into the model's prompt. Bundles keep the Hugging Face tokenizer config;
 * where its chat template is ChatML (SmolLM2, Qwen2) the prompt is wrapped the way the template does it,
 * including its default system message; otherwise the text is used as typed.
 */
class PromptFormatter(val style: Style, val defaultSystem: String? = null) {
    enum class Style { PLAIN, CHATML }

    fun format(user: String, system: String? = null): String = when (style) {
        Style.PLAIN -> user
        Style.CHATML -> buildString {
            val sys = system ?: defaultSystem
            if (sys != null) append("<|im_start|>system\n").append(sys).append("<|im_end|>\n")
            append("<|im_start|>user\n").append(user).append("<|im_end|>\n")
            append("<|im_start|>assistant\n")
        }
    }

    companion object {
        private val SYSTEM = Regex("<\\|im_start\\|>system\\n(.*?)<\\|im_end\\|>", RegexOption.DOT_MATCHES_ALL)

        /** The formatter for a Jinja chat template (null or unrecognised: plain text). */
        fun fromTemplate(template: String?): PromptFormatter {
            if (template == null || "<|im_start|>" !in template) return PromptFormatter(Style.PLAIN)
            val t = template.replace("\\n", "\n")  // templates stored with escaped newlines inside their literals
            val sys = SYSTEM.find(t)?.groupValues?.get(1)?.takeIf { "{{" !in it && "{%" !in it }
            return PromptFormatter(Style.CHATML, sys)
        }

        /** The formatter for a bundle: its tokenizer_config.json's chat template when the manifest says it has one. */
        fun forBundle(bundle: Bundle): PromptFormatter {
            if (!bundle.manifest.tokenizer.chatTemplate) return PromptFormatter(Style.PLAIN)
            val cfg = File(bundle.dir, "tokenizer_config.json")
            val template = if (cfg.isFile) {
                val root = JsonView(Json.parse(cfg.readText()))
                if (root.has("chat_template")) root["chat_template"].stringOrNull() else null
            } else null
            return fromTemplate(template)
        }
    }
}
