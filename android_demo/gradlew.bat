@rem A self-contained Gradle launcher for Windows: downloads the Gradle named in
@rem gradle\wrapper\gradle-wrapper.properties once into %USERPROFILE%\.gradle\wrapper\dists and runs it.
@echo off
setlocal
set APP_HOME=%~dp0
for /f "tokens=1,* delims==" %%a in ('findstr /b "distributionUrl=" "%APP_HOME%gradle\wrapper\gradle-wrapper.properties"') do set URL=%%b
set URL=%URL:\:=:%
for %%f in (%URL%) do set ZIP_NAME=%%~nxf& set DIST_NAME=%%~nf
set VERSION_DIR=%DIST_NAME:-bin=%
set DISTS=%USERPROFILE%\.gradle\wrapper\dists\%DIST_NAME%
if not exist "%DISTS%\%VERSION_DIR%\bin\gradle.bat" (
  mkdir "%DISTS%" 2>nul
  powershell -NoProfile -Command "Invoke-WebRequest -Uri '%URL%' -OutFile '%DISTS%\%ZIP_NAME%'; Expand-Archive -Force '%DISTS%\%ZIP_NAME%' '%DISTS%'" || exit /b 1
)
"%DISTS%\%VERSION_DIR%\bin\gradle.bat" -p "%APP_HOME%" %*
