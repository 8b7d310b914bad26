package org.faspedge.demo

import android.graphics.Color
import android.os.Bundle as AndroidBundle
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.CheckBox
import android.widget.EditText
import android.widget.ScrollView
import android.widget.Spinner
import android.widget.TextView
import androidx.appcompat.app.AppCompatActivity
import java.io.File
import java.util.concurrent.Executors
import org.faspedge.core.Backend
import org.faspedge.core.Backends
import org.faspedge.core.Bundle
import org.faspedge.core.BundleException
import org.faspedge.core.PromptFormatter

/**
 * Pick a bundle pushed into this app's files folder, load it, type a prompt, watch the tokens stream and
 * read load time, time to first token and tokens/s. Every failure is a message on screen, never a crash.
 */
class MainActivity : AppCompatActivity() {
    private val worker = Executors.newSingleThreadExecutor()
    private var runner: Runner? = null
    private var bundle: Bundle? = null
    private lateinit var bundles: Spinner
    private lateinit var backend: Spinner
    private lateinit var info: TextView
    private lateinit var stats: TextView
    private lateinit var output: TextView
    private lateinit var generate: Button
    private lateinit var stop: Button

    private val bundlesDir: File get() = File(getExternalFilesDir(null), "bundles")

    override fun onCreate(savedInstanceState: AndroidBundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        bundles = findViewById(R.id.bundles)
        backend = findViewById(R.id.backend)
        info = findViewById(R.id.bundle_info)
        stats = findViewById(R.id.stats)
        output = findViewById(R.id.output)
        generate = findViewById(R.id.generate)
        stop = findViewById(R.id.stop)
        backend.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, listOf("auto", "pte", "onnx"))
        findViewById<Button>(R.id.refresh).setOnClickListener { listBundles() }
        findViewById<Button>(R.id.load).setOnClickListener { load() }
        generate.setOnClickListener { generate() }
        stop.setOnClickListener { runner?.stop() }
        listBundles()
    }

    private fun listBundles() {
        bundlesDir.mkdirs()
        val names = bundlesDir.listFiles()?.filter { it.isDirectory }?.map { it.name }?.sorted().orEmpty()
        bundles.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, names)
        if (names.isEmpty()) showError(getString(R.string.no_bundles) + "\n(folder: ${bundlesDir.path})")
        else info.text = "${names.size} bundle(s) in ${bundlesDir.path}"
    }

    private fun load() {
        val name = bundles.selectedItem as? String ?: return showError(getString(R.string.no_bundles))
        val preferred = (backend.selectedItem as String).takeIf { it != "auto" }?.let { Backend.of(it) }
        generate.isEnabled = false
        info.setTextColor(stats.currentTextColor)
        info.text = "checking $name (sha256 of every file) …"
        worker.execute {
            try {
                runner?.close()
                runner = null
                val b = Bundle.open(File(bundlesDir, name))
                val plan = Backends.choose(b, preferred)
                val threads = Runtime.getRuntime().availableProcessors().coerceIn(1, 4)
                val r = Runner.open(b, plan, threads)
                bundle = b
                runner = r
                runOnUiThread {
                    info.text = "${b.manifest.describe()}\n${plan.backend.label}: ${plan.modelFile} + ${plan.tokenizerFile}; " +
                        String.format("loaded in %.0f ms", r.loadMs)
                    generate.isEnabled = true
                }
            } catch (e: BundleException) {
                runOnUiThread { showError(e.message ?: "this bundle cannot be used") }
            } catch (e: Throwable) {
                runOnUiThread { showError("could not load $name: ${e.message ?: e::class.java.simpleName}") }
            }
        }
    }

    private fun generate() {
        val r = runner ?: return
        val b = bundle ?: return
        val typed = findViewById<EditText>(R.id.prompt).text.toString()
        if (typed.isBlank()) return showError("type a prompt first")
        val chat = findViewById<CheckBox>(R.id.chat).isChecked
        val prompt = try {
            if (chat) PromptFormatter.forBundle(b).format(typed) else typed
        } catch (e: Exception) {
            typed  // an unreadable tokenizer_config.json: use the text as typed
        }
        output.text = ""
        stats.text = "generating …"
        generate.isEnabled = false
        stop.isEnabled = true
        val scroll = findViewById<ScrollView>(R.id.scroll)
        worker.execute {
            try {
                val s = r.generate(prompt, maxNewTokens = 256) { piece ->
                    runOnUiThread {
                        output.append(piece)
                        scroll.post { scroll.fullScroll(ScrollView.FOCUS_DOWN) }
                    }
                }
                runOnUiThread { stats.text = s.format() }
            } catch (e: Throwable) {
                runOnUiThread { showError("generation failed: ${e.message ?: e::class.java.simpleName}") }
            } finally {
                runOnUiThread {
                    generate.isEnabled = true
                    stop.isEnabled = false
                }
            }
        }
    }

    private fun showError(message: String) {
        info.setTextColor(Color.rgb(0xC0, 0x20, 0x20))
        info.text = message
    }

    override fun onDestroy() {
        worker.execute { runner?.close() }
        worker.shutdown()
        super.onDestroy()
    }
}
