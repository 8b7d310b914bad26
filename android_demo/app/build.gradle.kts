plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.faspedge.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.faspedge.demo"
        minSdk = 28
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk {
            abiFilters += listOf("arm64-v8a", "x86_64")  // what the ExecuTorch and ONNX Runtime AARs ship
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    packaging {
        jniLibs.useLegacyPackaging = true
    }
}

dependencies {
    implementation(project(":core"))
    // ExecuTorch's Android API (LlmModule: the C++ TextLLMRunner, XNNPACK). Keep it at or above the
    // executorch that exported the .pte (fasp-edge pins executorch 1.4.1 for export).
    // From Maven it brings its own fbjni and soloader (ExecuTorch's docs add those only for a local AAR).
    implementation("org.pytorch:executorch-android:1.4.0")
    implementation("com.microsoft.onnxruntime:onnxruntime-android:1.32.0")
    implementation("androidx.appcompat:appcompat:1.7.0")
}
