package fhirgate.hapi;

import ca.uhn.fhir.rest.server.RestfulServer;
import ch.qos.logback.classic.Level;
import ch.qos.logback.classic.Logger;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.slf4j.LoggerFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

/**
 * Starts the HAPI FHIR JPA server (R4, in-memory H2) on 127.0.0.1:PORT with base path /fhir and
 * prints one line, "LISTENING <port> (...)", once it serves. PORT = first argument, else env
 * HAPI_PORT, else 8080; 0 picks a free port.
 */
public class HapiServer {
	public static void main(String[] args) throws Exception {
		long t0 = System.nanoTime();
		((Logger) LoggerFactory.getLogger(org.slf4j.Logger.ROOT_LOGGER_NAME))
				.setLevel(Level.toLevel(System.getenv().getOrDefault("HAPI_LOG_LEVEL", "WARN")));
		int port = args.length > 0
				? Integer.parseInt(args[0])
				: Integer.parseInt(System.getenv().getOrDefault("HAPI_PORT", "8080"));

		AnnotationConfigApplicationContext spring = new AnnotationConfigApplicationContext(HapiConfig.class);
		RestfulServer fhirServlet = spring.getBean(RestfulServer.class);

		Server jetty = new Server();
		ServerConnector connector = new ServerConnector(jetty);
		connector.setHost("127.0.0.1");
		connector.setPort(port);
		jetty.addConnector(connector);
		ServletContextHandler handler = new ServletContextHandler();
		handler.setContextPath("/");
		ServletHolder holder = new ServletHolder(fhirServlet);
		holder.setInitOrder(1);
		handler.addServlet(holder, "/fhir/*");
		jetty.setHandler(handler);
		jetty.start();

		Runtime.getRuntime().addShutdownHook(new Thread(() -> {
			try {
				jetty.stop();
			} catch (Exception ignored) {
			}
			spring.close();
		}));
		System.out.printf("LISTENING %d (HAPI FHIR R4 JPA on http://127.0.0.1:%d/fhir, %.1f s)%n",
				connector.getLocalPort(), connector.getLocalPort(), (System.nanoTime() - t0) / 1e9);
		System.out.flush();
		// The test process holds our stdin open for as long as it needs us: when it exits (or is
		// killed) the pipe closes and so do we, so no server outlives its test run.
		if ("true".equals(System.getenv("HAPI_EXIT_ON_STDIN_CLOSE"))) {
			Thread watcher = new Thread(() -> {
				try {
					while (System.in.read() >= 0) {
						// nothing: only the end of the stream matters
					}
				} catch (java.io.IOException ignored) {
				}
				System.exit(0);
			});
			watcher.setDaemon(true);
			watcher.start();
		}
		jetty.join();
	}
}
